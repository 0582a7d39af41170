"""The check of every setting before any work (``lodo.experiment.config.validate``), fuzzed with Hypothesis.

Each property is tested against expectations written here by hand, independently of the
limit texts that the validator reads: what a good ``steps``, ``beta_1`` or ``task.window`` is.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lodo.experiment import config, limits, memory, registry
from lodo.experiment.config import ConfigError, validate

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any value a config can hold, the hostile ones first: non-finite and huge numbers, booleans where
# numbers go, text, nulls, lists of the wrong length, nested mappings.
SCALARS = st.one_of(
    st.sampled_from([0, 1, -1, 2, 0.0, 0.5, 1.0, -0.1, math.nan, math.inf, -math.inf, True, False, None, "",
                     "abc", "1", "nan", 10**20, -(10**20), 2**62, 2**63, 1e308, 5e-324, 180, 200, 1000]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.booleans(), st.none())
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.sampled_from(["a", "b"]), SCALARS,
                                                                            max_size=2))


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (is_int(v) and abs(v) < 1e300) or (isinstance(v, float) and math.isfinite(v))


# key -> what a good value is, written out by hand (the reference the validator is held to).
RUN_EXPECTED = {
    "steps": lambda v: is_int(v) and 1 <= v <= 2**62,
    "num_seeds": lambda v: is_int(v) and 1 <= v <= 2**31 - 1,  # seed=0 + num_seeds - 1 must stay an int32
    "seed": lambda v: is_int(v) and 0 <= v <= 2**31 - 8,  # seed + num_seeds - 1 must stay an int32 (num_seeds=8)
    "time_budget_s": lambda v: v is None or (is_number(v) and 0 < v <= 1e7),
    "log_every": lambda v: v is None or (is_int(v) and 0 <= v <= 2**62),
    "progress": lambda v: isinstance(v, bool),
    "record_trajectory": lambda v: v is None or isinstance(v, bool),
    "test_size": lambda v: v is None or (is_int(v) and v >= 1 and v <= 2**62),
    "checkpoint.every_s": lambda v: is_number(v) and 0 <= v <= 1e7,
    "checkpoint.keep": lambda v: is_int(v) and 1 <= v <= 2**62,
    "frozen.divergence_factor": lambda v: is_number(v) and v > 1,
}
# (task, optimizer, key) -> what a good value is.
GROUP_EXPECTED = {
    ("noisy_quadratic_bowl", "adam", "optimizer.learning_rate"): lambda v: is_number(v) and v > 0,
    ("noisy_quadratic_bowl", "adam", "optimizer.beta_1"): lambda v: is_number(v) and 0 <= v < 1,
    ("noisy_quadratic_bowl", "momentum", "optimizer.momentum"): lambda v: is_number(v) and 0 <= v < 1,
    ("noisy_quadratic_bowl", "rmsprop", "optimizer.rho"): lambda v: is_number(v) and 0 <= v < 1,
    ("noisy_quadratic_bowl", "lodo", "optimizer.beta"): lambda v: is_number(v) and 0 <= v < 1,
    ("noisy_quadratic_bowl", "lodo", "optimizer.num_layers"): lambda v: is_int(v) and 1 <= v <= 100_000,
    ("noisy_quadratic_bowl", "lodo", "optimizer.meta_optimizer"): lambda v: v in ("adam", "sgd"),
    ("noisy_quadratic_bowl", "lbfgs", "optimizer.memory"): lambda v: is_int(v) and 1 <= v <= 100_000,
    ("noisy_quadratic_bowl", "lodo", "task.dim"): lambda v: is_int(v) and 1 <= v <= 1_000_000,
    ("noisy_quadratic_bowl", "lodo", "task.noise_variance"): lambda v: is_number(v) and v >= 0,
    ("rosenbrock", "adam", "task.start"): lambda v: isinstance(v, list) and len(v) == 2 and all(map(is_number, v)),
    ("rosenbrock", "adam", "task.window"): lambda v: (isinstance(v, list) and len(v) == 2 and all(map(is_int, v))
                                                       and 0 <= v[0] < v[1] <= 2**62),
    ("pixelcnn_mnist", "adam", "task.data.source"): lambda v: v in ("tfds", "files", "synthetic"),
    ("pixelcnn_mnist", "adam", "task.batch_size"): lambda v: is_int(v) and 1 <= v <= 1_000_000,
}

_BASES: dict = {}


def base(task: str, optimizer: str):
    """The composed default config of a task and an optimizer (composed once per pair)."""
    from hydra import compose, initialize_config_dir

    if (task, optimizer) not in _BASES:
        with initialize_config_dir(str(registry.CONFIG_DIR), version_base="1.3"):
            _BASES[task, optimizer] = compose("config", overrides=[f"task={task}", f"optimizer={optimizer}"])
    return copy.deepcopy(_BASES[task, optimizer])


def put(cfg, key: str, value):
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value
    return cfg


@pytest.fixture(autouse=True)
def plenty_of_memory(monkeypatch):
    """The memory check is tested on its own; here every run fits."""
    monkeypatch.setattr(memory, "machine_bytes", lambda: 2**80)


def refused_in_one_line(cfg, key: str) -> ConfigError | None:
    try:
        validate(cfg)
    except ConfigError as err:
        text = str(err)
        assert "\n" not in text and len(text) < 400, text
        assert text.startswith(key + " ") or f" {key} " in text or text.startswith(key.rsplit(".", 1)[0]), text
        return err
    return None


@FUZZ
@given(key=st.sampled_from(sorted(RUN_EXPECTED)), value=VALUES)
def test_run_settings_are_accepted_exactly_when_good(key, value):
    cfg = put(base("noisy_quadratic_bowl", "lodo"), key, value)
    stored = OmegaConf.to_container(cfg, resolve=True)
    good = RUN_EXPECTED[key](_plain(stored, key))
    err = refused_in_one_line(cfg, key)
    assert (err is None) == good, (key, value, err)


@FUZZ
@given(case=st.sampled_from(sorted(GROUP_EXPECTED)), value=VALUES)
def test_hyperparameters_and_task_options_are_accepted_exactly_when_good(case, value):
    task, optimizer, key = case
    cfg = put(base(task, optimizer), key, value)
    good = GROUP_EXPECTED[case](_plain(OmegaConf.to_container(cfg, resolve=True), key))
    err = refused_in_one_line(cfg, key)
    assert (err is None) == good, (case, value, err)


def _plain(container: dict, key: str):
    for part in key.split("."):
        container = container[part]
    return container


ALL_PAIRS = [(t, o) for t in registry.names("task") for o in registry.names("optimizer")]


@FUZZ
@given(pair=st.sampled_from(ALL_PAIRS), value=VALUES, data=st.data())
def test_any_value_of_any_setting_is_accepted_or_refused_in_one_line_naming_it(pair, value, data):
    """Whatever the key and value: a ConfigError naming the key, or acceptance; never another exception."""
    cfg = base(*pair)
    plain = OmegaConf.to_container(cfg, resolve=False)
    keys = [k for k in config._flatten({g: plain[g] for g in ("task", "optimizer")})
            if k.split(".")[1] not in registry.OPTIMIZER_META_KEYS + registry.TASK_META_KEYS and "${" not in
            str(_plain(plain, k))]
    keys += [k for k in config.RUN_LIMITS if config._lookup(cfg, k) is not config._MISSING]
    key = data.draw(st.sampled_from(sorted(keys)))
    refused_in_one_line(put(cfg, key, value), key)


def test_a_valid_config_is_normalized_in_place():
    cfg = put(base("noisy_quadratic_bowl", "adam"), "optimizer.learning_rate", 1)
    validate(cfg)
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)


def test_every_shipped_default_and_tuned_file_is_valid():
    """Each optimizer's defaults (on the bowl), each task's (with LODO), and every tuned file on its pair."""
    tuned = [(p.parent.name, p.stem) for p in (registry.CONFIG_DIR / "tuned").glob("*/*.yaml")]
    pairs = {("noisy_quadratic_bowl", o) for o in registry.names("optimizer")} | {
        (t, "lodo") for t in registry.names("task")} | set(tuned)
    assert len(tuned) >= 30
    for task, optimizer in sorted(pairs):
        validate(base(task, optimizer))


@pytest.mark.parametrize("overrides, expected", [
    (["+foo.bar=1"], "unknown setting 'foo'"),
    (["+checkpoint.every=5"], "unknown setting 'checkpoint.every'"),
    (["optimizer=adam", "num_seeds=2", "optimizer.learning_rate=[0.1,0.2,0.3]"],
     "optimizer.learning_rate holds 3 per-seed values for num_seeds=2"),
    (["optimizer=bfgs", "optimizer.learning_rate=[0.1]"], "optimizer.learning_rate must be a positive number"),
    (["seed=2147483647", "num_seeds=2"], "seed + num_seeds - 1 must be at most 2147483647"),
    (["task.eig_min=0.5", "task.eig_max=0.1"], "task.eig_max must be a finite number >= 0.5 (eig_min)"),
    (["+optimizer.weight_decay=inf", "optimizer=adam"], "optimizer.weight_decay must be finite"),
])
def test_cross_setting_and_key_checks(overrides, expected):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(registry.CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert expected in str(err.value)


def test_per_seed_lists_are_accepted_where_the_optimizer_takes_them():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(registry.CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["optimizer=adam", "num_seeds=2", "optimizer.learning_rate=[1,0.5]"])
    validate(cfg)
    assert list(cfg.optimizer.learning_rate) == [1.0, 0.5]


# -- the limit texts --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, default, described, good, bad", [
    ("> 0", 0.1, "a positive number", [1, 1e-300, 2.5], [0, -1, math.nan, math.inf, True, "1"]),
    ("[0, 1)", 0.9, "a number in [0, 1)", [0, 0.999], [1, 1.0, -1e-9, None]),
    (">= 1", 4, "a positive integer", [1, 10**12], [0, 1.0, True, 2**63]),
    ("integer in [1, 10] or null", None, "a positive integer <= 10 or null", [None, 1, 10], [0, 11, 2.0]),
    ("one of tfds, files", "tfds", "one of tfds, files", ["files"], ["web", 1, None]),
    (">= 0 increasing", [180, 200], "a list of 2 integers >= 0, increasing", [[0, 1]], [[1, 1], [2, 1], [1], [-1, 0]]),
    (None, [-0.5, 2.0], "a list of 2 finite numbers", [[1, 2.5]], [[1.0], [1, math.nan], "ab", [True, 1]]),
    (None, 16, "an integer", [-3, 0], [1.5, "16", False]),
    ("true/false or null", None, "true or false or null", [True, None], [0, "true"]),
])
def test_limit_texts(text, default, described, good, bad):
    limit = limits.parse(text, default)
    assert limit.describe() == described
    for value in good:
        limit.check(value)
    for value in bad:
        with pytest.raises(ValueError):
            limit.check(value)


@pytest.mark.parametrize("text", ["positive", "[0, 1", "> x", "one of", "(0 1)"])
def test_unreadable_limit_texts_are_refused(text):
    with pytest.raises((limits.LimitSyntaxError, ValueError)):
        limit = limits.parse(text, 1.0)
        if not limit.choices:
            raise ValueError("read as no limit")


# -- the memory estimate -----------------------------------------------------------------------------

@given(st.text(max_size=30))
@settings(max_examples=100, deadline=None)
def test_a_footprint_is_arithmetic_only(text):
    try:
        value = memory.evaluate(text, {"n": 3, "dim": 4})
    except memory.FootprintError:
        return
    assert isinstance(value, float)


@pytest.mark.parametrize("text", ["__import__('os').getcwd()", "n.real", "[n]", "open('x')", "lambda: 1", "n if n else 1"])
def test_a_footprint_cannot_run_code(text):
    with pytest.raises(memory.FootprintError):
        memory.evaluate(text, {"n": 3})


@pytest.mark.parametrize("name", ["lodo", "lodo_diagonal", "lodo_global", "lodo_residuals", "lodo_sgd",
                                  "lodo_no_momentum"])
def test_the_lodo_footprints_count_the_state_that_init_allocates(name):
    """The YAML's expression against the numbers ``lodo.algorithm.init`` actually allocates for one seed."""
    import tensorflow as tf

    from lodo import algorithm, meta_optimizers, variants

    variant = variants.BY_NAME[name]
    settings_ = variant.settings({})
    entry = registry.optimizer(name)
    for n in (10, 100):
        small = {**settings_, **({"num_layers": 2} if "num_layers" in settings_ else {})}
        state = algorithm.init(n, [0], variant.make_preconditioner(small), meta_optimizers.make(
            small["meta_optimizer"], 0.001), dtype=tf.float64)
        allocated = sum(int(np.prod(leaf.shape)) for leaf in tf.nest.flatten(state))
        estimated = memory.evaluate(entry.footprint["state"], {**small, "n": n})
        assert 0.7 * allocated <= estimated <= 1.6 * allocated + 16, (n, allocated, estimated)


def test_a_run_that_cannot_fit_is_refused_with_its_size(monkeypatch):
    monkeypatch.setattr(memory, "machine_bytes", lambda: 8 * 2**30)
    cfg = put(base("noisy_quadratic_bowl", "lodo"), "task.dim", 100_000)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    # 8 seeds x 2 x dim^2 float64 = 1,192 GiB of Hessians (and their eigenvectors while drawn)
    assert "needs at least 1,19" in str(err.value) and "task constants 1,192 GiB" in str(err.value)
    assert "this machine has 8.0 GiB" in str(err.value)
    validate(put(base("noisy_quadratic_bowl", "lodo"), "task.dim", 1000))  # 0.1 GiB: fits
