"""Optimizers and tasks by name: the one registry of the experiment framework.

An entry is its YAML in ``configs/optimizer/`` or ``configs/task/`` (the
``optimizer=…`` and ``task=…`` config groups): besides the settings that the
optimizer or task takes, the YAML declares what the framework needs to know
about it, so adding one never means editing a list somewhere else.

Optimizer YAML keys that describe the entry (everything else is a hyperparameter):
  ``label``     its name in tables and figures;
  ``order``     its row in the paper's tables (lower first; unset: after the paper's, by name);
  ``keras``     dotted path of a Keras optimizer class or factory that trains a model
                (image tasks); null: the optimizer only runs on the small tasks;
  ``engine``    dotted path of a factory of a ``lodo.functional.EngineOptimizer`` for the
                multi-seed engine (small tasks), or ``keras``: the Keras optimizer itself, one instance
                per seed on that seed's row (``lodo.functional.PerSeedKeras``: exact per seed for any
                rule, and per-seed hyperparameter lists work); null: image tasks only;
  ``per_seed``  the engine factory also takes each float hyperparameter as a list with one value
                per seed (the genetic tuner then trains a whole generation in one program;
                without it, each individual is a job of its own);
  ``tune``      the genetic tuner's search space (``rate``: log x, ``decay``: log(1 − x));
  ``limits``    what each hyperparameter may be, e.g. ``beta_1: "[0, 1)"`` (``lodo.experiment.limits``),
                checked with every other setting before any work;
  ``footprint`` ``state:`` the numbers of state it keeps per seed, an expression in ``n`` and its
                hyperparameters, for the memory check (``lodo.experiment.memory``).
Task YAML keys that describe the entry:
  ``label``, ``class`` (dotted path of a ``tasks.base.SmallTask`` or ``tasks.image_base.ImageTask``),
  ``ga_schedule`` (the genetic tuner's schedule, a name in ``configs/hydra/sweeper/ga.yaml``),
  ``steps`` (the paper's step budget, which the run's ``steps`` defaults to), ``limits`` (as for an
  optimizer; a nested option is written ``data.source``), ``footprint`` (``parameters``,
  ``constants`` and ``bytes_per_number``, expressions in the task's options).

Reading the registry parses YAML only; a task's or optimizer's module is imported
when it is built, so a bad name is refused before TensorFlow loads.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml



def _config_dir() -> Path:
    """The Hydra configs: the installed package ``lodo_configs`` (a wheel), else a checkout's ``configs/``.

    An editable install is a path entry for the checkout (``editable_mode=compat``): Hydra finds the GA
    sweeper by listing the ``hydra_plugins`` folder, which setuptools' strict editable finder hides, and
    the configs are then the checkout's own folder, where the tuner also installs tuned files.
    """
    try:
        return Path(str(importlib.resources.files("lodo_configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs"


CONFIG_DIR = _config_dir()

OPTIMIZER_META_KEYS = ("name", "label", "order", "keras", "engine", "per_seed", "tune", "limits", "footprint")
TASK_META_KEYS = ("name", "label", "class", "ga_schedule", "steps", "limits", "footprint")


class RegistryError(ValueError):
    """An unknown name or a hyperparameter an entry does not take, said in one line."""


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    label: str
    order: float
    keras: str | None
    engine: str | None
    per_seed: bool
    tune: dict
    defaults: dict = field(repr=False)  # the YAML's hyperparameters
    limits: dict = field(default_factory=dict, repr=False)
    footprint: dict = field(default_factory=dict, repr=False)

    @property
    def runs_on_small_tasks(self) -> bool:
        return self.engine is not None

    @property
    def runs_on_models(self) -> bool:
        return self.keras is not None


@dataclass(frozen=True)
class TaskEntry:
    name: str
    label: str
    cls: str
    ga_schedule: str | None
    defaults: dict = field(repr=False)
    limits: dict = field(default_factory=dict, repr=False)
    footprint: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def task_class(self) -> type:
        return resolve(self.cls, f"task {self.name!r}: class")

    @property
    def is_image_task(self) -> bool:
        from tasks.image_base import ImageTask

        return issubclass(self.task_class, ImageTask)


def resolve(path: str, what: str):
    """The object at a dotted path ``package.module.name`` (``module:name`` also accepted)."""
    module, _, attr = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise RegistryError(f"{what} {path!r} cannot be imported ({err})") from None


def _read(group: str) -> dict[str, dict]:
    entries = {}
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RegistryError(f"{path} is not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise RegistryError(f"{path} must hold a mapping of settings")
        entries[path.stem] = data
    return entries


# Entries added by code rather than by a YAML file (``add_task``/``add_optimizer``): a notebook's own task, a test's toy.
_ADDED: dict[str, dict[str, dict]] = {"optimizer": {}, "task": {}}


@functools.lru_cache(maxsize=None)
def _files(group: str) -> dict[str, dict]:
    return _read(group)


def _entries(group: str) -> dict[str, dict]:
    return {**_files(group), **_ADDED[group]}


def names(group: str) -> list[str]:
    """The registered names of ``group`` ("optimizer" or "task"), sorted."""
    return sorted(_entries(group))


def _lookup(group: str, name: str) -> dict:
    entries = _entries(group)
    if name not in entries:
        raise RegistryError(f"unknown {group} {name!r}; valid {group} names: {', '.join(sorted(entries))}")
    return entries[name]


def optimizer(name: str) -> OptimizerEntry:
    data = _lookup("optimizer", name)
    order = data.get("order")
    return OptimizerEntry(name=name, label=str(data.get("label") or name),
                          order=math.inf if order is None else float(order),
                          keras=data.get("keras"), engine=data.get("engine"), per_seed=bool(data.get("per_seed")),
                          tune=dict(data.get("tune") or {}),
                          defaults={k: v for k, v in data.items() if k not in OPTIMIZER_META_KEYS},
                          limits=_mapping(data, "limits", f"optimizer {name!r}"),
                          footprint=_mapping(data, "footprint", f"optimizer {name!r}"))


def task(name: str) -> TaskEntry:
    data = _lookup("task", name)
    if not data.get("class"):
        raise RegistryError(f"task {name!r} names no class: add `class: package.module.TaskClass` to its YAML")
    return TaskEntry(name=name, label=str(data.get("label") or name), cls=str(data["class"]),
                     ga_schedule=data.get("ga_schedule"),
                     defaults={k: v for k, v in data.items() if k not in TASK_META_KEYS},
                     limits=_mapping(data, "limits", f"task {name!r}"), footprint=_mapping(data, "footprint", f"task {name!r}"))


def _mapping(data: dict, key: str, what: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise RegistryError(f"{what}: {key} must be a mapping of setting: value, got {value!r}")
    return dict(value)


def add_optimizer(name: str, **entry) -> None:
    """Register an optimizer from code, with the keys its YAML would have."""
    _ADDED["optimizer"][name] = {"name": name, **entry}


def add_task(name: str, **entry) -> None:
    """Register a task from code, with the keys its YAML would have (``class`` may be the class itself)."""
    cls = entry.get("class")
    if isinstance(cls, type):
        entry["class"] = f"{cls.__module__}.{cls.__qualname__}"
    _ADDED["task"][name] = {"name": name, **entry}


def remove(group: str, name: str) -> None:
    """Undo ``add_optimizer``/``add_task``."""
    _ADDED[group].pop(name, None)


# --- what the framework asks -------------------------------------------------------------------------

def label(name: str) -> str:
    """The optimizer's name in tables and figures (the name itself if it is not registered)."""
    try:
        return optimizer(name).label
    except RegistryError:
        return name


def order_key(name: str):
    """Sort key for table rows: the paper's order, then unregistered or unordered names by name."""
    try:
        return (optimizer(name).order, name)
    except RegistryError:
        return (math.inf, name)


PAPER_ORDERS_END = 20  # the paper's optimizers have order <= 20; the newer ones of "Beyond the paper" above it
NEWER_THROUGHPUT_TARGET = 2000  # seed-steps/s on the bowl (8 seeds, 2-core CPU) each newer one must reach


def beyond_the_paper(name: str) -> bool:
    """An optimizer the paper did not compare (ordered after the paper's; unregistered names count as such)."""
    return order_key(name)[0] > PAPER_ORDERS_END


def optimizer_options(node) -> dict:
    """The hyperparameters in an ``optimizer`` config group (without the keys that describe the entry)."""
    return {k: v for k, v in _plain(node).items() if k not in OPTIMIZER_META_KEYS}


def task_options(node) -> dict:
    """The constructor options in a ``task`` config group (without the keys that describe the entry)."""
    return {k: v for k, v in _plain(node).items() if k not in TASK_META_KEYS}


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def is_image_task(name: str) -> bool:
    return task(name).is_image_task


def build_task(name: str, **options):
    """Task ``name`` with ``options`` (its YAML's settings, overridden), or a one-line ValueError."""
    entry = task(name)
    cls = entry.task_class
    _check_keywords(f"task {name!r}", options, inspect.signature(cls).parameters, "option")
    return cls(**options)


def build_engine_optimizer(name: str, **hparams):
    """The multi-seed engine's optimizer ``name`` with these hyperparameters, or a one-line ValueError."""
    from lodo.functional import PerSeedKeras

    entry = optimizer(name)
    if entry.engine is None:
        raise RegistryError(f"optimizer {name!r} trains Keras models only (image tasks); it has no multi-seed form "
                            f"for the small tasks")
    hparams.pop("tune", None)
    if entry.engine == "keras":
        make = resolve(entry.keras, f"optimizer {name!r}: keras")
        check_hyperparameters(name, hparams, _hyperparameters(make), per_seed=entry.per_seed)
        return PerSeedKeras(name, make, hparams)
    make = resolve(entry.engine, f"optimizer {name!r}: engine")
    check_hyperparameters(name, hparams, _hyperparameters(make), per_seed=entry.per_seed)
    return make(**hparams)


def build_keras_optimizer(name: str, *, seed: int = 0, **hparams):
    """The Keras optimizer ``name`` for a model, or a one-line ValueError.

    ``seed`` draws the randomness an optimizer owns (LODO's permutations and initial
    blocks); it is passed to factories that take it.
    """
    entry = optimizer(name)
    if entry.keras is None:
        raise RegistryError(f"optimizer {name!r} cannot be run on tasks of this scale (it needs the exact Hessian, "
                            f"a dense n×n matrix or a second gradient per step); use it on a small task "
                            f"({', '.join(n for n in names('task') if not is_image_task(n))})")
    hparams.pop("tune", None)
    make = resolve(entry.keras, f"optimizer {name!r}: keras")
    accepted = _hyperparameters(make)
    check_hyperparameters(name, hparams, accepted)
    if "seed" in inspect.signature(make).parameters:
        hparams["seed"] = seed
    return make(**hparams)


def _hyperparameters(make) -> dict:
    """The keyword parameters of a factory or class that a config may set."""
    return {k: p for k, p in inspect.signature(make).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in ("self", "name", "seed")}


def _check_keywords(what: str, given: dict, parameters, kind: str) -> None:
    accepted = [k for k, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise RegistryError(f"{what} has no {kind} {', '.join(unknown)}; it takes: {', '.join(accepted)}")


def check_hyperparameters(name: str, hparams: dict, parameters, per_seed: bool = False) -> None:
    """One-line error for a hyperparameter the factory lacks, or a non-number where it wants one.

    With ``per_seed``, a float hyperparameter may also be a non-empty list of numbers (one per seed).
    """
    unknown = sorted(set(hparams) - set(parameters))
    if unknown:
        raise RegistryError(f"optimizer {name!r} has no hyperparameter {', '.join(unknown)}; "
                            f"it takes: {', '.join(parameters)}")
    for key, value in hparams.items():
        default = parameters[key].default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, (list, tuple)) and isinstance(default, float):  # one value per seed
                if not per_seed:
                    takes = ", ".join(n for n in names("optimizer") if optimizer(n).per_seed)
                    raise RegistryError(f"optimizer.{key} must be one number: {name!r} takes no per-seed lists "
                                        f"(those that do: {takes})")
                if not value or not all(_is_number(v) for v in value):
                    raise RegistryError(f"optimizer.{key} must be a number or a non-empty list of numbers (one per "
                                        f"seed), got {value!r}")
            elif not _is_number(value):
                raise RegistryError(f"optimizer.{key} must be a number, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
