"""Tasks by name.

Small tasks (vectorized over seeds) run in ``lodo.experiment.engine``; image tasks (a
Keras model and a dataset) run in ``lodo.experiment.trainer``. Image tasks are imported
on first use, so the small tasks never pay for their dependencies.
"""

from __future__ import annotations

import importlib

from tasks.noisy_quadratic_bowl import NoisyQuadraticBowl
from tasks.rosenbrock import Rosenbrock

SMALL_TASKS = {cls.name: cls for cls in (NoisyQuadraticBowl, Rosenbrock)}
IMAGE_TASKS = {
    "pixelcnn_mnist": "tasks.pixelcnn_mnist:PixelCNNMNIST",
    "resnet18_cifar10": "tasks.resnet18_cifar10:ResNet18CIFAR10",
}


def is_image_task(name: str) -> bool:
    return name in IMAGE_TASKS


def build(name: str, **options):
    if name in SMALL_TASKS:
        return SMALL_TASKS[name](**options)
    if name in IMAGE_TASKS:
        module, attr = IMAGE_TASKS[name].split(":")
        return getattr(importlib.import_module(module), attr)(**options)
    valid = sorted([*SMALL_TASKS, *IMAGE_TASKS])
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(valid)}")
