"""Optimizers and tasks by name: the one registry of the experiment framework.

(Transitional: delegates to the old name tables while they move here.)
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

import optimizers
import tasks

# Keys of a config group that describe the entry rather than configure it.
OPTIMIZER_META_KEYS = ("name", "tune")
TASK_META_KEYS = ("name", "steps")


def optimizer_options(node: DictConfig) -> dict:
    """The optimizer's hyperparameters from its config group (without the keys that describe it)."""
    return {k: v for k, v in _plain(node).items() if k not in OPTIMIZER_META_KEYS}


def task_options(node: DictConfig) -> dict:
    """The task's constructor options from its config group."""
    return {k: v for k, v in _plain(node).items() if k not in TASK_META_KEYS}


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def build_task(name: str, **options):
    return tasks.build(name, **options)


def is_image_task(name: str) -> bool:
    return tasks.is_image_task(name)


def build_engine_optimizer(name: str, **hparams):
    return optimizers.build(name, **hparams)


def build_keras_optimizer(name: str, *, seed: int = 0, **hparams):
    from optimizers import model_optimizers

    return model_optimizers.build(name, seed=seed, **hparams)
