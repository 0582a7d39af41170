"""Tasks by name. Small tasks (vectorized over seeds) run in ``lodo.engine``."""

from tasks.noisy_quadratic_bowl import NoisyQuadraticBowl
from tasks.rosenbrock import Rosenbrock

SMALL_TASKS = {cls.name: cls for cls in (NoisyQuadraticBowl, Rosenbrock)}


def build(name: str, **options):
    if name not in SMALL_TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(SMALL_TASKS))}")
    return SMALL_TASKS[name](**options)
