"""L2LBGDBGD: the LSTM against NumPy, the engine's trajectory, weight files, a tiny meta-training."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from lodo.experiment.engine import Engine
from optimizers import l2lbgdbgd
from reference import numpy_bowl
from lodo.experiment import registry

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("meta_train_l2l", ROOT / "scripts" / "meta_train_l2l.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_preprocess(g, arch):
    if arch.preprocessing == "scaled":
        return arch.input_scale * g[:, None]
    large = np.abs(g) >= np.exp(-arch.p)
    first = np.where(large, np.log(np.maximum(np.abs(g), 1e-300)) / arch.p, -1.0)
    second = np.where(large, np.sign(g), np.exp(arch.p) * g)
    return np.stack([first, second], axis=-1)


def np_cell(x, h, c, kernel, bias):
    """Textbook LSTM with separate gate matrices (input, forget, cell, output)."""
    k = h.shape[-1]
    wx, wh = kernel[:x.shape[-1]], kernel[x.shape[-1]:]
    gate = [x @ wx[:, j * k:(j + 1) * k] + h @ wh[:, j * k:(j + 1) * k] + bias[j * k:(j + 1) * k] for j in range(4)]
    c_new = sigmoid(gate[1]) * c + sigmoid(gate[0]) * np.tanh(gate[2])
    return sigmoid(gate[3]) * np.tanh(c_new), c_new


def np_optimizer(weights, arch, n):
    """One coordinate-wise L2LBGDBGD on n coordinates as a NumPy closure: grad -> step."""
    state = [[np.zeros((n, arch.hidden)), np.zeros((n, arch.hidden))] for _ in range(2)]

    def step(grad):
        inputs = np_preprocess(grad, arch)
        for layer in range(2):
            state[layer] = list(np_cell(inputs, *state[layer], weights[f"layer{layer}_kernel"],
                                        weights[f"layer{layer}_bias"]))
            inputs = state[layer][0]
        return arch.output_scale * (inputs @ weights["out_kernel"] + weights["out_bias"])[:, 0]
    return step


def random_weights(arch, seed, out_gain=20.0):
    weights = l2lbgdbgd.init_weights(arch, np.random.default_rng(seed))
    weights["out_kernel"] = weights["out_kernel"] * out_gain  # big enough steps to make the test bite
    weights["out_bias"] = np.array([0.05], np.float32)
    return {k: v.astype(np.float64) for k, v in weights.items()}


@pytest.mark.parametrize("preprocessing", ["scaled", "log_sign"])
def test_lstm_matches_numpy(preprocessing):
    arch = l2lbgdbgd.Architecture(preprocessing=preprocessing, input_scale=0.7, output_scale=0.3)
    weights = random_weights(arch, 1)
    rng = np.random.default_rng(2)
    x, h, c = rng.standard_normal((6, 3)), rng.standard_normal((6, 20)), rng.standard_normal((6, 20))
    kernel, bias = rng.standard_normal((23, 80)), rng.standard_normal(80)
    got = l2lbgdbgd.lstm_cell(tf.constant(x), tf.constant(h), tf.constant(c), tf.constant(kernel), tf.constant(bias))
    for a, b in zip(got, np_cell(x, h, c, kernel, bias)):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-12)

    reference = np_optimizer(weights, arch, 15)
    state = l2lbgdbgd.initial_state([3, 5], arch, tf.float64)
    tf_weights = {k: tf.constant(v) for k, v in weights.items()}
    for _ in range(4):
        grad = rng.standard_normal((3, 5)) * np.exp(rng.uniform(-14, 2, (3, 5)))  # some below e^-p
        step, state = l2lbgdbgd.apply(tf_weights, state, tf.constant(grad), arch)
        assert state[1][0].shape == (3, 5, 20)
        np.testing.assert_allclose(step.numpy().ravel(), reference(grad.ravel()), rtol=1e-11, atol=1e-13)


def bowl_reference(bowl, seed, steps, update):
    """NumPy loop over one seed's bowl (as in test_engine): ``update(grad)`` returns the step."""
    return numpy_bowl(bowl, seed, steps, lambda theta, grad, t: theta - update(grad(theta)))[-1]


@pytest.mark.slow
def test_engine_follows_the_numpy_rule_per_seed(tmp_path):
    arch = l2lbgdbgd.Architecture(output_scale=0.5)
    weights = random_weights(arch, 3)
    path = tmp_path / "w.npz"
    l2lbgdbgd.save(path, weights, arch)
    bowl = registry.build_task("noisy_quadratic_bowl", dim=12)
    expected = [bowl_reference(bowl, s, 8, np_optimizer(weights, arch, 12)) for s in (2, 7)]
    assert np.abs(expected[0]).max() > 0.5  # it moved
    for dtype, rtol in (("float64", 1e-10), ("float32", 2e-5)):
        engine = Engine(bowl, registry.build_engine_optimizer("l2lbgdbgd", weights=str(path), compute_dtype=dtype), [2, 7],
                        chunk_size=8)
        engine.run(8)
        np.testing.assert_allclose(engine.params.numpy(), np.stack(expected), rtol=rtol, atol=rtol, err_msg=dtype)


def test_missing_weights_give_one_line_error(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(ValueError) as err:
        registry.build_engine_optimizer("l2lbgdbgd", weights=str(missing))
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and "make meta-train-l2l" in message
    with pytest.raises(ValueError, match="compute_dtype"):
        registry.build_engine_optimizer("l2lbgdbgd", compute_dtype="float16")


def test_weights_round_trip(tmp_path):
    arch = l2lbgdbgd.Architecture(preprocessing="log_sign", p=8.0, input_scale=2.0, output_scale=0.1)
    weights = l2lbgdbgd.init_weights(arch, np.random.default_rng(4))
    l2lbgdbgd.save(tmp_path / "w.npz", weights, arch, iterations=7, note="x")
    loaded, loaded_arch, info = l2lbgdbgd.load(tmp_path / "w.npz")
    assert loaded_arch == arch and info == {"iterations": 7, "note": "x"}
    for name in l2lbgdbgd.WEIGHT_NAMES:
        np.testing.assert_array_equal(loaded[name], weights[name])
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]  # no temporary file left behind


@pytest.mark.slow
def test_tiny_meta_training_learns_and_its_weights_drive_the_engine(tmp_path):
    script = load_script()
    out = tmp_path / "tiny.npz"
    flags = ["--iterations", "40", "--batch", "4", "--dim", "10", "--unroll", "5", "--reset-every", "4",
             "--log-every", "10", "--lr", "0.01", "--out", str(out)]
    script.main(flags)
    weights, arch, info = l2lbgdbgd.load(out)
    assert info["meta_loss_last"] < 0.7 * info["meta_loss_first"]
    again, _, _ = script.meta_train(script.parse_args(flags), log=lambda line: None)
    for name in l2lbgdbgd.WEIGHT_NAMES:  # seeded and deterministic
        np.testing.assert_array_equal(again[name], weights[name])
    engine = Engine(registry.build_task("noisy_quadratic_bowl", dim=10), registry.build_engine_optimizer("l2lbgdbgd", weights=str(out)),
                    [0, 1], chunk_size=50)
    assert np.isfinite(engine.run(50).loss_matrix()).all()


def test_shipped_weights_come_from_the_make_target_defaults():
    config = yaml.safe_load((ROOT / "configs" / "optimizer" / "l2lbgdbgd.yaml").read_text())
    assert config["name"] == "l2lbgdbgd"
    optimizer = registry.build_engine_optimizer("l2lbgdbgd", **registry.optimizer_options(config))
    assert optimizer.weights_path == ROOT / "optimizers" / "weights" / "l2lbgdbgd_bowl.npz"
    defaults = vars(load_script().parse_args([]))
    for key, value in optimizer.info.items():
        if key in defaults:
            assert value == defaults[key], key
    assert optimizer.arch.preprocessing == defaults["preprocessing"]
