"""Every check of a run's settings, in one place, before any work starts.

Three kinds of check live here:
- ``check_group_choices``: the ``task=``/``optimizer=``/``experiment=`` names on
  the command line, before Hydra composes anything (one line instead of Hydra's
  several);
- ``validate``: the composed config's run settings (steps, seeds, checkpointing, …),
  one line naming the key and an example of a good value;
- ``check_same_run``: a run folder resumed or skipped must hold this very run.

Each raises ``ConfigError``; the CLI prints it as one line with exit status 2.
The optimizer's hyperparameters and the task's options are checked by the
registry when they are built.
"""

from __future__ import annotations

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from lodo.experiment import registry


class ConfigError(ValueError):
    """A bad setting, reported as one line naming the problem and the fix."""


FRESH_HINT = "delete {dir} or rerun with checkpoint.resume=false to start fresh"
CHECKED_GROUPS = ("task", "optimizer", "experiment", "distribute", "scale")


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
        group = override.key_or_group.lstrip("+~")
        if group not in CHECKED_GROUPS or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        valid = group_options(group)
        for value in values:
            if value is not None and str(value) != "null" and str(value) not in valid:
                raise ConfigError(f"unknown {group} {value!r}; valid {group} names: {', '.join(valid)}")


# -- the run settings -------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


def _optional(check):
    return lambda value: value is None or check(value)


# key: (check, what a good value is, an example). A key missing from the config is not checked
# (older configs and tests compose without some of them).
RULES = {
    "steps": (_positive_int, "a positive integer", "steps=1000"),
    "num_seeds": (_positive_int, "a positive integer", "num_seeds=8"),
    "chunk_size": (_positive_int, "a positive integer", "chunk_size=1000"),
    "seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer", "seed=0"),
    "time_budget_s": (_optional(lambda v: _is_number(v) and v > 0), "a positive number of seconds or null",
                      "time_budget_s=300"),
    "log_every": (_optional(lambda v: _is_int(v) and v >= 0), "a non-negative integer or null", "log_every=100"),
    "hessian_every": (_optional(lambda v: _is_int(v) and v >= 0), "a non-negative integer or null",
                      "hessian_every=5000"),
    "record_trajectory": (lambda v: v in (None, True, False), "true, false or null", "record_trajectory=true"),
    "deterministic": (lambda v: v in (True, False), "true or false", "deterministic=true"),
    "gpu_per_job": (lambda v: v in (True, False), "true or false", "gpu_per_job=true"),
    "progress": (lambda v: v in (True, False), "true or false", "progress=false"),
    "artifacts": (lambda v: v in (True, False), "true or false", "artifacts=false"),
    "test_size": (_optional(_positive_int), "a positive integer or null", "test_size=1000"),
    "max_batch_size": (_optional(_positive_int), "a positive integer or null", "max_batch_size=64"),
    "eval_every": (_optional(_positive_int), "a positive integer or null", "eval_every=100"),
    "checkpoint.every_s": (lambda v: _is_number(v) and v >= 0,
                           "a non-negative number of seconds (0: after every chunk)", "checkpoint.every_s=600"),
    "checkpoint.keep": (_positive_int, "a positive integer", "checkpoint.keep=2"),
    "checkpoint.resume": (lambda v: v in (True, False), "true or false", "checkpoint.resume=false"),
    "frozen.steps": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (0: no frozen test)",
                     "frozen.steps=20000"),
    "frozen.divergence_factor": (lambda v: _is_number(v) and v > 1, "a number above 1",
                                 "frozen.divergence_factor=1e6"),
}
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


def validate(cfg: DictConfig) -> None:
    """Every run setting in ``RULES``; the first bad one as a ConfigError naming its key."""
    for key, (check, wanted, example) in RULES.items():
        value = _lookup(cfg, key)
        if value is not _MISSING and not check(value):
            raise ConfigError(f"{key} must be {wanted}, got {value!r} (e.g. {example})")


# -- the same run? ----------------------------------------------------------------------------------

# Settings that may differ between a run and its resumption: they change how a run is watched,
# where it runs, or how the entry is described in tables, never its numbers.
NOT_COMPARED = ("progress", "checkpoint", "gpu_per_job", "artifacts")
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
