"""L2LBGDBGD (Andrychowicz et al. 2016): a coordinate-wise LSTM that maps gradients to steps.

Every coordinate of every seed runs the same 2-layer LSTM (20 hidden units per
layer, weights φ shared across coordinates) on its own gradient history:

    x_t        = preprocess(g_t)                       per coordinate
    (h¹, c¹)   = LSTM₁(x_t, h¹, c¹);  (h², c²) = LSTM₂(h¹, h², c²)
    θ_{t+1}    = θ_t − output_scale · (W_out h² + b_out)

φ is meta-trained beforehand (``scripts/meta_train_l2l.py``) and frozen here.
Everything is a pure function over explicit state, so the same code runs
inside the meta-training unroll (differentiated) and in the engine (XLA).

Preprocessing: ``scaled`` feeds x = input_scale · g; ``log_sign`` is the
paper's (log|g|/p, sign g) for |g| ≥ e^−p, else (−1, e^p g). The shipped
weights use ``scaled`` (output_scale 1): on a quadratic the good update is
close to linear in the gradient history (heavy-ball-like), and log/sign makes
the LSTM rebuild that linear map from a compressed magnitude. With the same
meta-training budget (20-step truncations) on 8 held-out bowls x 20k steps,
``scaled`` reached a loss of 15.0, ``log_sign`` 19.7 (output_scale 1) and
20.0 (output_scale 0.1, the paper's).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from lodo.functional import FunctionalOptimizer

ROOT = Path(__file__).resolve().parent.parent  # holds optimizers/weights/ in a checkout and when installed
DEFAULT_WEIGHTS = "optimizers/weights/l2lbgdbgd_bowl.npz"
MAKE_TARGET = "make meta-train-l2l"
WEIGHT_NAMES = ("layer0_kernel", "layer0_bias", "layer1_kernel", "layer1_bias", "out_kernel", "out_bias")
PREPROCESSINGS = ("scaled", "log_sign")


@dataclass(frozen=True)
class Architecture:
    """What the weights mean; saved next to them so a file is self-describing."""

    preprocessing: str = "scaled"
    p: float = 10.0
    input_scale: float = 1.0
    output_scale: float = 1.0
    hidden: int = 20

    def __post_init__(self):
        if self.preprocessing not in PREPROCESSINGS:
            raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {self.preprocessing!r}")

    @property
    def num_inputs(self) -> int:
        return 1 if self.preprocessing == "scaled" else 2


def init_weights(arch: Architecture, rng: np.random.Generator) -> dict:
    """Glorot-uniform kernels, forget-gate bias 1 (long memory at the start), a small output layer."""
    h = arch.hidden

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)

    def gate_bias():
        b = np.zeros(4 * h, np.float32)
        b[h:2 * h] = 1.0  # gate order i, f, g, o
        return b

    return {
        "layer0_kernel": glorot(arch.num_inputs + h, 4 * h),
        "layer0_bias": gate_bias(),
        "layer1_kernel": glorot(2 * h, 4 * h),
        "layer1_bias": gate_bias(),
        "out_kernel": (0.1 * glorot(h, 1)),
        "out_bias": np.zeros(1, np.float32),
    }


def preprocess(grad, arch: Architecture):
    """Per-coordinate LSTM inputs ``[..., num_inputs]`` from gradients ``[...]``."""
    if arch.preprocessing == "scaled":
        return (arch.input_scale * grad)[..., None]
    p = tf.cast(arch.p, grad.dtype)
    magnitude = tf.abs(grad)
    large = magnitude >= tf.exp(-p)
    log_part = tf.math.log(tf.where(large, magnitude, tf.ones_like(magnitude))) / p
    first = tf.where(large, log_part, -tf.ones_like(grad))
    second = tf.where(large, tf.sign(grad), tf.exp(p) * grad)
    return tf.stack([first, second], axis=-1)


def lstm_cell(x, h, c, kernel, bias):
    """One LSTM step on rows ``[B, ·]``: gates from one matmul of [x, h], order i, f, g, o."""
    z = tf.matmul(tf.concat([x, h], axis=-1), kernel) + bias
    i, f, g, o = tf.split(z, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    return tf.sigmoid(o) * tf.tanh(c), c


def initial_state(shape, arch: Architecture, dtype=tf.float32):
    """Zero (h, c) for both layers, each ``shape + [hidden]`` (e.g. ``[S, n, 20]``)."""
    zeros = tf.zeros(list(shape) + [arch.hidden], dtype)
    return ((zeros, zeros), (zeros, zeros))


def apply(weights: dict, state, grad, arch: Architecture):
    """(step, new state) for gradients of any shape ``[...]``; the caller does θ ← θ − step.

    Coordinates are flattened into rows so each layer is one ``[rows, ·] × [·, 4·hidden]`` matmul.
    """
    shape = tf.shape(grad)
    x = tf.reshape(preprocess(grad, arch), [-1, arch.num_inputs])
    new_state, inputs = [], x
    for layer, (h, c) in enumerate(state):
        h, c = lstm_cell(inputs, tf.reshape(h, [-1, arch.hidden]), tf.reshape(c, [-1, arch.hidden]),
                         weights[f"layer{layer}_kernel"], weights[f"layer{layer}_bias"])
        new_state.append((h, c))
        inputs = h
    out = tf.matmul(inputs, weights["out_kernel"]) + weights["out_bias"]
    step = arch.output_scale * tf.reshape(out, shape)
    state_shape = tf.concat([shape, [arch.hidden]], axis=0)
    return step, tuple((tf.reshape(h, state_shape), tf.reshape(c, state_shape)) for h, c in new_state)


def resolve(path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def save(path, weights: dict, arch: Architecture, **info) -> None:
    """Weights, architecture and free-form ``info`` (scalars/strings), written atomically."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.asarray(weights[name], np.float32) for name in WEIGHT_NAMES}
    arrays.update({f"arch_{k}": np.asarray(v) for k, v in asdict(arch).items()})
    arrays.update({f"info_{k}": np.asarray(v) for k, v in info.items()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shipped file unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path) -> tuple[dict, Architecture, dict]:
    """(weights, architecture, info) from a file written by ``save``; one-line error if missing."""
    resolved = resolve(path)
    if not resolved.is_file():
        raise ValueError(f"L2LBGDBGD weight file {resolved} not found; create it with `{MAKE_TARGET}`")
    with np.load(resolved, allow_pickle=False) as data:
        weights = {name: data[name] for name in WEIGHT_NAMES}
        arch = Architecture(**{k: data[f"arch_{k}"].item() for k in Architecture.__dataclass_fields__})
        info = {k[len("info_"):]: data[k].item() for k in data.files if k.startswith("info_")}
    return weights, arch, info


class L2LBGDBGD(FunctionalOptimizer):
    """The frozen meta-trained LSTM on the engine's ``[S, n]`` parameters; state ``[S, n, 20]`` × 2 layers.

    ``compute_dtype`` is the LSTM's precision. float32 (the default) is the
    precision the weights were trained in and runs about twice as fast as
    float64 on CPU; the step is cast back to the parameters' dtype.
    """

    def __init__(self, weights: str = DEFAULT_WEIGHTS, compute_dtype: str = "float32"):
        if compute_dtype not in ("float32", "float64"):
            raise ValueError(f"optimizer.compute_dtype must be float32 or float64, got {compute_dtype!r}")
        self.weights_path = resolve(weights)
        self.weights, self.arch, self.info = load(weights)
        self.compute_dtype = tf.as_dtype(compute_dtype)

        def init(n, seeds, dtype):
            return initial_state([len(seeds), n], self.arch, self.compute_dtype)

        def update(state, grad, params, oracle):
            weights = {k: tf.constant(v, self.compute_dtype) for k, v in self.weights.items()}
            step, state = apply(weights, state, tf.cast(grad, self.compute_dtype), self.arch)
            return tf.cast(step, grad.dtype), state

        super().__init__("l2lbgdbgd", init, update)
