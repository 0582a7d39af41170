"""Every check of a run's settings, in one place, before any work starts.

Three kinds of check live here:
- ``check_group_choices``: the ``task=``/``optimizer=``/``experiment=`` names on
  the command line, before Hydra composes anything (one line instead of Hydra's
  several);
- ``validate``: every setting of the composed config (run settings, the optimizer's
  hyperparameters, the task's options, whether it fits in memory), before TensorFlow
  starts: one line naming the key and what it must be;
- ``check_same_run``: a run folder resumed or skipped must hold this very run.

Each raises ``ConfigError``; the CLI prints it as one line with exit status 2.
What a setting may be is written as a limit text (``lodo.experiment.limits``), here for the
run settings and in each optimizer's and task's YAML for theirs. Only what needs the optimizer's
code (a hyperparameter its YAML does not list) is checked later, when the registry builds it.
"""

from __future__ import annotations

import functools
import math

import yaml
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict

from lodo.experiment import limits, memory, registry


class ConfigError(ValueError):
    """A bad setting, reported as one line naming the problem and the fix."""


FRESH_HINT = "delete {dir} or rerun with checkpoint.resume=false to start fresh"
SEED_MAX = 2**31 - 1  # seeds reach TensorFlow and Keras as int32
CHECKED_GROUPS = ("task", "optimizer", "experiment", "distribute", "scale")
# Hydra's run-folder settings: empty, they would put the run's files into the current directory.
FOLDER_KEYS = {"hydra.run.dir": "hydra.run.dir=runs/my_run", "hydra.sweep.dir": "hydra.sweep.dir=runs/my_sweep",
               "hydra.sweep.subdir": "hydra.sweep.subdir=${optimizer.name}"}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (registry.CONFIG_DIR / group).glob("*.yaml"))


def check_group_choices(argv: list[str]) -> None:
    """Reject unknown task/optimizer/experiment names before Hydra composes anything.

    Hydra's own message for a missing option spans several lines; this one
    names the bad value and lists the valid ones on one line.
    """
    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return  # a bad flag: Hydra's own usage message says which
    overrides = []
    for text in args.overrides:
        try:
            overrides.extend(OverridesParser.create().parse_overrides([text]))
        except OverrideParseException as err:
            detail = str(err).strip().splitlines()[0]
            raise ConfigError(f"malformed override {text!r} ({detail}); write key=value, +key=value to add a key, "
                              f"~key to remove one (quote values with spaces or brackets)") from None
    for override in overrides:
        if override.key_or_group in FOLDER_KEYS and not override.is_delete() and not override.is_sweep_override() \
                and not str(override.value() or "").strip():
            raise ConfigError(f"{override.key_or_group} is empty; give a folder, e.g. {FOLDER_KEYS[override.key_or_group]}")
        group = override.key_or_group.lstrip("+~")
        if group not in CHECKED_GROUPS or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        valid = group_options(group)
        for value in values:
            if value is not None and str(value) != "null" and str(value) not in valid:
                raise ConfigError(f"unknown {group} {value!r}; valid {group} names: {', '.join(valid)}")


# -- the run settings -------------------------------------------------------------------------------

# key: (limit, an example of a good value), in the words of ``lodo.experiment.limits``. A key missing
# from the config is not checked (older configs and tests compose without some of them).
RUN_LIMITS = {
    "steps": ("integer >= 1", "steps=1000"),
    "num_seeds": ("integer >= 1", "num_seeds=8"),
    "chunk_size": ("integer >= 1", "chunk_size=1000"),
    "seed": (f"integer in [0, {SEED_MAX}]", "seed=0"),
    "time_budget_s": ("number in (0, 1e7] or null", "time_budget_s=300"),
    "log_every": ("integer >= 0 or null", "log_every=100"),
    "hessian_every": ("integer >= 0 or null", "hessian_every=5000"),
    "record_trajectory": ("true/false or null", "record_trajectory=true"),
    "deterministic": ("true/false", "deterministic=true"),
    "gpu_per_job": ("true/false", "gpu_per_job=true"),
    "progress": ("true/false", "progress=false"),
    "verbose": ("true/false", "verbose=true"),
    "scale_suffix": ("text", "scale_suffix=-mine"),
    "artifacts": ("true/false", "artifacts=false"),
    "test_size": ("integer >= 1 or null", "test_size=1000"),
    "max_batch_size": ("integer >= 1 or null", "max_batch_size=64"),
    "eval_every": ("integer >= 1 or null", "eval_every=100"),
    "checkpoint.every_s": ("number in [0, 1e7]", "checkpoint.every_s=600"),
    "checkpoint.keep": ("integer >= 1", "checkpoint.keep=2"),
    "checkpoint.resume": ("true/false", "checkpoint.resume=false"),
    "checkpoint.keep_final": ("true/false", "checkpoint.keep_final=false"),
    "frozen.steps": ("integer >= 0", "frozen.steps=20000"),
    "frozen.problem_offset": ("integer >= 0", "frozen.problem_offset=1"),
    "frozen.divergence_factor": ("number > 1", "frozen.divergence_factor=1e6"),
    "frozen.control": ("true/false", "frozen.control=true"),
    "distribute.num_cpu_devices": ("integer in [1, 1024] or null", "distribute.num_cpu_devices=2"),
    "distribute.cluster_resolver": ("one of tf_config, slurm", "distribute.cluster_resolver=slurm"),
}
# What "(0: …)" means where zero is special, said after the limit.
RUN_NOTES = {"checkpoint.every_s": "seconds; 0: after every chunk", "frozen.steps": "0: no frozen test",
             "time_budget_s": "seconds", "log_every": "null: steps/1000", "hessian_every": "0: off"}
# The config groups whose contents are checked against their own entry's limits (below), not RUN_LIMITS.
GROUPS = ("task", "optimizer", "distribute")
_MISSING = object()


def _lookup(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if node is None or not hasattr(node, "get"):
            return _MISSING
        node = node.get(part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def _flatten(node: dict, like: dict | None = None, prefix: str = "") -> dict:
    """``{"data": {"source": "tfds"}}`` as ``{"data.source": "tfds"}``; with ``like``, only where ``like`` (the
    YAML's own values) has a mapping too, so that a mapping given for a number stays one value, and is refused."""
    flat = {}
    for key, value in node.items():
        inner = None if like is None else like.get(key)
        if isinstance(value, dict) and value and (like is None or isinstance(inner, dict)):
            flat.update(_flatten(value, inner, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _store(cfg, key: str, value) -> None:
    """Put a checked value back (an integer given for a number becomes that float)."""
    if not OmegaConf.is_config(cfg):
        return
    node = cfg
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    if node.get(last) != value or type(node.get(last)) is not type(value):
        with open_dict(node):
            node[last] = value


def _check(key: str, limit: limits.Limit, value, example: str | None = None, note: str | None = None):
    try:
        return limit.check(value)
    except ValueError as err:
        said = str(err) + (f" ({note})" if note else "")
        raise ConfigError(f"{key} must be {said}, got {_shown(value)}"
                          + (f" (e.g. {example})" if example else "")) from None


def _shown(value) -> str:
    """A value as it was written on the command line (true, null, inf), cut short when long."""
    def spelled(v):
        if isinstance(v, bool) or v is None:
            return {True: "true", False: "false", None: "null"}[v]
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(map(spelled, v)) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {spelled(x)}" for k, x in v.items()) + "}"
        return repr(v)

    text = spelled(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(key: str, value) -> None:
    """A setting no limit describes (e.g. one added with +optimizer.…) may still not be NaN or infinite."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise ConfigError(f"{key} must be finite, got {_shown(value)}")


def validate(cfg: DictConfig) -> None:
    """Every setting of a composed config, before any work: the first bad one as a ConfigError naming its key.

    Run settings by ``RUN_LIMITS``; the optimizer's hyperparameters and the task's options by the
    ``limits:`` (and the types) of their YAML; then whether the run fits in this machine's memory.
    Values are normalized in place (an integer given for a number becomes that float).
    """
    for key, (text, example) in RUN_LIMITS.items():
        value = _lookup(cfg, key)
        if value is not _MISSING:
            _store(cfg, key, _check(key, limits.parse(text), value, example, RUN_NOTES.get(key)))
    _check_known_keys(cfg)
    seed, num_seeds = _lookup(cfg, "seed"), _lookup(cfg, "num_seeds")
    if seed is not _MISSING and num_seeds is not _MISSING and seed + num_seeds - 1 > SEED_MAX:
        raise ConfigError(f"seed + num_seeds - 1 must be at most {SEED_MAX}, got {seed + num_seeds - 1} (seeds "
                          f"{seed} … {seed + num_seeds - 1}); lower seed")
    try:
        if _lookup(cfg, "optimizer.name") is not _MISSING:
            _check_group(cfg, "optimizer", registry.optimizer(cfg.optimizer.name), registry.OPTIMIZER_META_KEYS)
        if _lookup(cfg, "task.name") is not _MISSING:
            _check_group(cfg, "task", registry.task(cfg.task.name), registry.TASK_META_KEYS)
        _check_memory(cfg)
    except (registry.RegistryError, limits.LimitSyntaxError, memory.FootprintError) as err:
        raise ConfigError(str(err)) from None


def _check_known_keys(cfg) -> None:
    """A setting the config does not have (``+foo=1``, ``+checkpoint.every=5``) is a typo, not a new setting."""
    known = _known_settings()
    if not known or not OmegaConf.is_config(cfg):
        return
    for key in cfg.keys():
        if key in GROUPS:
            continue
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}; the settings are {', '.join(sorted(known))} and the groups "
                              f"{', '.join(GROUPS)} (configs/config.yaml)")
        if isinstance(known[key], dict) and OmegaConf.is_dict(cfg[key]):
            for inner in cfg[key].keys():
                if inner not in known[key]:
                    raise ConfigError(f"unknown setting '{key}.{inner}'; {key} has {', '.join(known[key])}")


@functools.lru_cache(maxsize=1)
def _known_settings() -> dict:
    try:
        data = yaml.safe_load((registry.CONFIG_DIR / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in data.items() if k not in ("defaults", "hydra")}


def _check_group(cfg, group: str, entry, meta_keys) -> None:
    """The hyperparameters (or task options) against the entry's YAML: its values' types and its ``limits:``."""
    options = {k: v for k, v in _plain(cfg[group]).items() if k not in meta_keys}
    given = _flatten(options, like=entry.defaults)
    defaults = _flatten(entry.defaults)
    num_seeds = cfg.get("num_seeds") if OmegaConf.is_config(cfg) else None
    for key, value in given.items():
        full = f"{group}.{key}"
        text = entry.limits.get(key)
        if key not in defaults and text is None:
            _finite(full, value)
            continue
        limit = limits.parse(text, defaults.get(key), names=given)
        per_seed = getattr(entry, "per_seed", False) and limit.kind == "number"
        if per_seed and isinstance(value, (list, tuple)):
            checked = [_check(full, limit, v, note="or a list of such numbers, one per seed") for v in value]
            if not checked or (isinstance(num_seeds, int) and len(checked) != num_seeds):
                raise ConfigError(f"{full} holds {len(checked)} per-seed values for num_seeds={num_seeds}; give one "
                                  f"number, or one per seed")
        else:
            checked = _check(full, limit, value)
        _store(cfg, full, checked)


def _check_memory(cfg) -> None:
    """Refuse, in one line, a run whose estimated size exceeds this machine's memory."""
    if _lookup(cfg, "task.name") is _MISSING or _lookup(cfg, "optimizer.name") is _MISSING:
        return
    task_entry, optimizer_entry = registry.task(cfg.task.name), registry.optimizer(cfg.optimizer.name)
    if not task_entry.footprint:
        return
    plain = _plain(cfg)
    steps = plain.get("steps") or 1
    parts = memory.estimate(task_footprint=task_entry.footprint, optimizer_footprint=optimizer_entry.footprint,
                            task_options=_flatten(registry.task_options(plain["task"])),
                            hyperparameters=registry.optimizer_options(plain["optimizer"]),
                            num_seeds=plain.get("num_seeds") or 1, steps=steps,
                            record_trajectory=bool(plain.get("record_trajectory")))
    needed, available = sum(parts.values()), memory.machine_bytes()
    if needed > available:
        small_only = optimizer_entry.keras is None
        raise ConfigError(f"this run needs at least {memory.gib(needed)} of memory ({memory.describe(parts)}), "
                          f"this machine has {memory.gib(available)}; lower the sizes (task.…, optimizer.…, "
                          f"num_seeds or steps)" + (f"; {cfg.optimizer.name} is meant for the small tasks (it has "
                                                    f"no Keras form for models)" if small_only else ""))


# -- the same run? ----------------------------------------------------------------------------------

# Settings that may differ between a run and its resumption: they change how a run is watched,
# where it runs, or how the entry is described in tables, never its numbers.
NOT_COMPARED = ("progress", "verbose", "scale_suffix", "checkpoint", "gpu_per_job", "artifacts")
NOT_COMPARED_IN_GROUP = {"optimizer": set(registry.OPTIMIZER_META_KEYS) - {"name"},
                         "task": set(registry.TASK_META_KEYS) - {"name", "steps"}}


def comparable(config) -> dict:
    """A resolved config as a plain dict, without the settings a resumed run may change."""
    plain = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    out = {k: v for k, v in plain.items() if k not in NOT_COMPARED}
    for group, ignored in NOT_COMPARED_IN_GROUP.items():
        if isinstance(out.get(group), dict):
            out[group] = {k: v for k, v in out[group].items() if k not in ignored}
    return out


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested dicts."""
    found = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            found.extend(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def check_same_run(stored: dict, cfg, out_dir, what: str) -> None:
    """Refuse to resume (or skip) ``what`` in ``out_dir`` when it was made with other settings."""
    changed = differences(comparable(stored), comparable(cfg))
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(f"{out_dir} holds {what} with other settings ({shown}); rerun with the same settings "
                          f"to resume, or {FRESH_HINT.format(dir=out_dir)}")
