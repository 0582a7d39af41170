"""The Hydra configs of ``python -m lodo.run``, installed as the package ``lodo_configs``."""
