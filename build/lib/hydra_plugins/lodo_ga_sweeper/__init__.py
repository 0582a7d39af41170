"""The paper's genetic-algorithm tuner (SPEC §4.1) as a Hydra sweeper: ``python -m lodo.run -m hydra/sweeper=ga …``.

Hydra finds it by scanning the ``hydra_plugins`` namespace package (this
folder sits at the repository root, which is on ``PYTHONPATH``); its config
is ``configs/hydra/sweeper/ga.yaml``.
"""
