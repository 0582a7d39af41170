"""The tasks: small ones (a loss over ``[S, n]`` parameters of S seeds, ``tasks.base.SmallTask``) run in the
multi-seed engine; image ones (a Keras model and a dataset, ``tasks.image_base.ImageTask``) train a model per seed.

Each task is a module here and a YAML in ``configs/task/`` naming its class (``lodo.experiment.registry``
reads them); modules are imported on first use, so the small tasks never pay for the image tasks'
dependencies.
"""
