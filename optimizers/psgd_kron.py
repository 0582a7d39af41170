"""PSGD with a Kronecker-factored preconditioner ("Kron"; Li 2018 and its later Kron form), for Keras and the engine.

PSGD fits a preconditioner P = QᵀQ online, from the gradients alone, by the
gradient-whitening criterion E[hᵀP h + vᵀP⁻¹v] with a random probe v ~ N(0, I),
whose minimiser is P = E[hhᵀ]^(-1/2). Like LODO, it learns its preconditioner
during optimization; unlike LODO, from a closed-form fitting criterion rather
than from the loss of the next step.

A parameter is viewed as a matrix H (m × k): rank ≥ 2 tensors as
[prod(shape[:-1]), shape[-1]] (a conv kernel [3, 3, Cin, Cout] as [9·Cin, Cout]),
and P = (Q_Lᵀ Q_L) ⊗ (Q_Rᵀ Q_R), so that P h = Q_LᵀQ_L H Q_RᵀQ_R. A 1-D tensor (a
bias, or the engine's parameter vector of one seed) has one factor: P h = QᵀQ h.
Each Q is upper triangular, or diagonal on a side longer than
``max_size_triangular``. One step, with t the count of steps already taken:

    m ← β1·m + (1 − β1)·g,   h = m / (1 − β1^(t+1))            (bias-corrected momentum)
    with probability p (the preconditioner update, on h):
        A = Q_L H Q_Rᵀ,  B = Q_L⁻ᵀ V Q_R⁻¹                        (V ~ N(0, I), triangular solves)
        per side: Q ← Q − lr_p / ‖T1 + T2‖_lb · triu(T1 − T2) Q   (left: T1 = AAᵀ, T2 = BBᵀ;
                                                                   right: T1 = AᵀA, T2 = BᵀB)
    u = P h (with the updated Q), u ← u · min(1, 1.1 / (rms(u) + 1e-6))
    θ ← θ − lr·u

The Q update is a step on the group of invertible upper-triangular matrices
(multiplicative, so Q stays upper triangular); ‖·‖_lb is a cheap lower
bound of the spectral norm (``norm_lower_bound``), which makes the step
scale-free; a diagonal Q uses the diagonals of T1, T2 and their largest
absolute value instead. The RMS clip at 1.1 is the Kron form's: P is fitted to
whiten, so a well-fitted step has RMS ≈ lr, and the clip bounds the steps
taken while P is still far off. As in the Kron form the preconditioner is
fitted to the momentum h rather than to the raw gradient.

Initial Q: scale^(1/r)·I on each of the r factors, so P = scale²·I, with
scale = mean(|g|⁴)^(-1/8) of the parameter's first gradient (P g then has
entries of order 1), or ``preconditioner_init_scale`` when it is > 0 (0, the
default, means "from the first gradient"; a list per seed may mix both).

Randomness: the probe V and, for p < 1, the update's coin come from stateless
Philox draws keyed by (a key from the seed, the step count) (``probes``,
``update_coins``), so runs are reproducible and seeds independent. The draws are
always XLA-compiled, because XLA's stateless kernels give other numbers than
TensorFlow's and the engine runs under XLA; the Keras class draws them the same
way in eager, graph and jit-compiled training. Instead of the Kron form's
annealed probability (1, decaying to ~0.03) the probability is a fixed
hyperparameter, default 1; a skipped update is a ``tf.cond`` branch that costs
nothing.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from lodo.functional import FunctionalOptimizer, is_per_seed, seed_values

RMS_CLIP = 1.1  # the Kron form's bound on the RMS of the preconditioned step
RMS_EPSILON = 1e-6
_STREAM = 0x5053_4744  # separates this optimizer's draws from a task's streams


# -- randomness -------------------------------------------------------------------------------------

def draw_keys(seed: int, index: int = 0) -> tuple[int, int]:
    """The (probe, coin) keys of parameter ``index`` (0 for the engine's vector) under ``seed``."""
    probe, coin = np.random.SeedSequence([int(seed), _STREAM, int(index)]).generate_state(2, np.uint32)
    return int(probe), int(coin)


@tf.function(jit_compile=True)
def probes(keys, step, shape, dtype):
    """V ~ N(0, I) of ``shape`` per key (``[K, *shape]``) at ``step``: one stateless draw per key.

    ``shape`` is the matrix view's, ``[m, k]`` (``[n, 1]`` for a vector), as both front ends draw it.
    """
    step = tf.cast(step, tf.int64)
    return tf.stack([tf.random.stateless_normal(shape, seed=tf.stack([keys[i], step]), dtype=dtype, alg="philox")
                     for i in range(keys.shape[0])])


@tf.function(jit_compile=True)
def update_coins(keys, step, dtype):
    """u ~ U[0, 1) per key at ``step``: the preconditioner is updated where u < p."""
    step = tf.cast(step, tf.int64)
    return tf.stack([tf.random.stateless_uniform([], seed=tf.stack([keys[i], step]), dtype=dtype, alg="philox")
                     for i in range(keys.shape[0])])


# -- the maths, on [..., m, k] matrices with any leading (seed) axes -------------------------------

def _times(q, x, dense, side, transpose=False):
    """Q x (left) or x Qᵀ (right); with ``transpose``, Qᵀ x or x Q."""
    if side == "left":
        return tf.linalg.matmul(q, x, transpose_a=transpose) if dense else q[..., :, None] * x
    return tf.linalg.matmul(x, q, transpose_b=not transpose) if dense else x * q[..., None, :]


def _solve(q, x, dense, side, substitute=False):
    """Q⁻ᵀ x (left) or x Q⁻¹ (right); ``substitute``: the left solve row by row (``_substitution``)."""
    if side == "left":
        if not dense:
            return x / q[..., :, None]
        return _substitution(q, x) if substitute else tf.linalg.triangular_solve(q, x, lower=False, adjoint=True)
    if not dense:
        return x / q[..., None, :]
    return tf.linalg.matrix_transpose(
        tf.linalg.triangular_solve(q, tf.linalg.matrix_transpose(x), lower=False, adjoint=True))


def _substitution(q, x):
    """Q⁻ᵀ x for upper-triangular ``q [..., n, n]``, ``x [..., n, k]``: forward substitution in a while loop.

    XLA on CPU expands ``triangular_solve`` into an O(n³) inversion of the diagonal
    block; for the engine's one right-hand side this O(n²) loop was 11x faster (n = 100, 8 seeds).
    """
    n = q.shape[-1]
    diagonal = tf.linalg.diag_part(q)

    def body(i, rest, out):
        row = (rest[..., i, :] / diagonal[..., i, None])[..., None, :]  # x_i = r_i / Q_ii
        rest = rest - q[..., i, :, None] * row  # r_j −= Q_ij x_i
        return i + 1, rest, out + tf.one_hot(i, n, dtype=q.dtype)[:, None] * row

    return tf.while_loop(lambda i, *_: i < n, body, (tf.constant(0), x, tf.zeros_like(x)))[2]


def norm_lower_bound(a):
    """A lower bound of the spectral norm of symmetric PSD ``a [..., d, d]``: ‖A x̂‖, x = A·(its longest column).

    One step of power iteration from the longest column, which for PSD matrices is
    within a small factor of the norm, for three matrix-vector products.
    """
    largest = tf.reduce_max(tf.abs(a), axis=[-2, -1])
    safe = tf.where(largest > 0, largest, tf.ones_like(largest))
    a = a / safe[..., None, None]
    column = tf.argmax(tf.reduce_sum(tf.square(a), axis=-2), axis=-1)
    x = tf.linalg.matvec(a, tf.one_hot(column, a.shape[-1], dtype=a.dtype))
    x = tf.linalg.matvec(a, x)
    norm_x = tf.norm(x, axis=-1)
    bound = tf.norm(tf.linalg.matvec(a, x), axis=-1) / tf.where(norm_x > 0, norm_x, tf.ones_like(norm_x))
    return largest * bound


def _lie_step(q, t1, t2, dense, lr):
    """Q ← Q − lr / ‖T1 + T2‖ · triu(T1 − T2) Q (dense), or its diagonal form."""
    tiny = np.finfo(q.dtype.as_numpy_dtype).tiny
    if dense:
        scale = lr / (norm_lower_bound(t1 + t2) + tiny)
        return q - scale[..., None, None] * tf.linalg.matmul(tf.linalg.band_part(t1 - t2, 0, -1), q)
    scale = lr / (tf.reduce_max(tf.abs(t1 + t2), axis=-1) + tiny)
    return q - scale[..., None] * (t1 - t2) * q


def update_preconditioner(factors, dense, h, v, lr, substitute=False):
    """One fitting step of the factors (Q_L, Q_R or None) to ``h [..., m, k]`` with probe ``v``; ``lr [...]``."""
    q_left, q_right = factors
    a = _times(q_left, h, dense[0], "left")
    b = _solve(q_left, v, dense[0], "left", substitute)
    if q_right is not None:
        a = _times(q_right, a, dense[1], "right")
        b = _solve(q_right, b, dense[1], "right")
    if dense[0]:
        t1, t2 = tf.linalg.matmul(a, a, transpose_b=True), tf.linalg.matmul(b, b, transpose_b=True)
    else:
        t1, t2 = tf.reduce_sum(tf.square(a), axis=-1), tf.reduce_sum(tf.square(b), axis=-1)
    new_left = _lie_step(q_left, t1, t2, dense[0], lr)
    if q_right is None:
        return new_left, None
    if dense[1]:
        t1, t2 = tf.linalg.matmul(a, a, transpose_a=True), tf.linalg.matmul(b, b, transpose_a=True)
    else:
        t1, t2 = tf.reduce_sum(tf.square(a), axis=-2), tf.reduce_sum(tf.square(b), axis=-2)
    return new_left, _lie_step(q_right, t1, t2, dense[1], lr)


def precondition(factors, dense, h):
    """P h = Q_LᵀQ_L H Q_RᵀQ_R."""
    q_left, q_right = factors
    out = _times(q_left, _times(q_left, h, dense[0], "left"), dense[0], "left", transpose=True)
    if q_right is not None:
        out = _times(q_right, _times(q_right, out, dense[1], "right"), dense[1], "right", transpose=True)
    return out


def initial_factors(shapes, dense, g, init_scale):
    """scale^(1/r)·I per factor, scale = ``init_scale`` where > 0, else mean(|g|⁴)^(-1/8) (1 for g = 0).

    ``g [..., m, k]``, ``init_scale [...]``. mean(|g|⁴) is taken as max|g|⁴·mean((g/max|g|)⁴)
    so that float32 gradients neither overflow nor underflow.
    """
    largest = tf.reduce_max(tf.abs(g), axis=[-2, -1])
    safe = tf.where(largest > 0, largest, tf.ones_like(largest))
    fourth = tf.reduce_mean(tf.square(tf.square(g / safe[..., None, None])), axis=[-2, -1])
    measured = tf.where(largest > 0, tf.pow(fourth, -0.125) / tf.sqrt(safe), tf.ones_like(largest))
    scale = tf.where(init_scale > 0, init_scale, measured)
    factors = [size for size in shapes if size is not None]
    per_factor = tf.pow(scale, 1.0 / len(factors))
    out = []
    for size, is_dense in zip(shapes, dense):
        if size is None:
            out.append(None)
        elif is_dense:
            out.append(per_factor[..., None, None] * tf.eye(size, dtype=g.dtype))
        else:
            out.append(per_factor[..., None] * tf.ones([size], g.dtype))
    return tuple(out)


def clip_rms(u):
    """u · min(1, 1.1 / (rms(u) + 1e-6)), the RMS over each [m, k] matrix."""
    rms = tf.sqrt(tf.reduce_mean(tf.square(u), axis=[-2, -1], keepdims=True))
    return u * tf.minimum(tf.ones_like(rms), RMS_CLIP / (rms + RMS_EPSILON))


def matrix_view(shape) -> tuple[int, int | None]:
    """(m, k) of the matrix a tensor of ``shape`` is viewed as; k = None: a vector with one factor."""
    shape = [int(d) for d in shape]
    if len(shape) <= 1:
        return (shape[0] if shape else 1), None
    return math.prod(shape[:-1]), shape[-1]


def _check_number(name, value, low, high=None, low_open=True, high_open=False):
    for v in (value if is_per_seed(value) else [value]):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > low if low_open else v >= low) and (high is None or (v < high if high_open else v <= high))
        if not ok:
            if high is None:
                bound = f"{'>' if low_open else '>='} {low:g}"
            else:
                bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"PSGD-Kron {name} must be a number {bound}, got {v!r}")


def check_hyperparameters(learning_rate, beta_1, preconditioner_lr, preconditioner_update_probability,
                          max_size_triangular, preconditioner_init_scale):
    """One-line ValueError for a bad setting (each entry of a per-seed list is checked)."""
    if isinstance(learning_rate, (int, float, list, tuple)):  # Keras checks schedules, callables and variables
        _check_number("learning_rate", learning_rate, 0.0)
    _check_number("beta_1", beta_1, 0.0, 1.0, low_open=False, high_open=True)
    _check_number("preconditioner_lr", preconditioner_lr, 0.0)
    _check_number("preconditioner_update_probability", preconditioner_update_probability, 0.0, 1.0)
    _check_number("preconditioner_init_scale", preconditioner_init_scale, 0.0, low_open=False)
    size = max_size_triangular
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) \
            or int(size) != size or size < 1:
        raise ValueError(f"PSGD-Kron max_size_triangular must be a positive integer, got {size!r}")


# -- the Keras optimizer ------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="lodo_baselines")
class PSGDKron(keras.optimizers.Optimizer):
    """PSGD-Kron for ``model.compile``/``model.fit``, ``apply_gradients`` loops and ``tf.distribute``.

    Each variable has its own preconditioner (see the module docstring), so the
    standard per-variable ``update_step``, which sees the all-reduced gradient,
    is all it needs. ``seed`` keys the probes (per variable, with the variable's
    index); the step count, for the probes and the bias correction, is
    ``iterations`` (as Adam's). ``preconditioner_init_scale`` None or 0 means
    "from the first gradient". Other keyword arguments (``clipnorm``,
    ``weight_decay``, ``use_ema``, …) are Keras's own.

    A whitened step has RMS ≈ lr per entry, as Adam's does, so the default
    lr = 1e-3 is Adam's; on a small MLP it trained faster than Adam at 1e-3
    and 3e-3, and 1e-2 stalled. The noisy bowl wants lr ≈ 1 instead: its
    center moves by σ = 1 per coordinate and step, which θ can only follow
    with steps of that size.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, preconditioner_lr=0.1, preconditioner_update_probability=1.0,
                 max_size_triangular=8192, preconditioner_init_scale=0.0, seed=0, name=None, **kwargs):
        if preconditioner_init_scale is None:
            preconditioner_init_scale = 0.0
        check_hyperparameters(learning_rate, beta_1, preconditioner_lr, preconditioner_update_probability,
                              max_size_triangular, preconditioner_init_scale)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"PSGD-Kron seed must be a non-negative integer, got {seed!r}")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = float(beta_1)
        self.preconditioner_lr = float(preconditioner_lr)
        self.preconditioner_update_probability = float(preconditioner_update_probability)
        self.max_size_triangular = int(max_size_triangular)
        self.preconditioner_init_scale = float(preconditioner_init_scale)
        self.seed = int(seed)

    def _layout(self, variable):
        m, k = matrix_view(variable.shape)
        return (m, k), (m <= self.max_size_triangular, k is not None and k <= self.max_size_triangular)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._momentums, self._factors = [], []
        for variable in variables:
            self._momentums.append(self.add_variable_from_reference(variable, name="momentum"))
            factors = []
            for size, dense, side in zip(*self._layout(variable), ("left", "right")):
                if size is None:
                    continue
                prefix = (variable.path.replace("/", "_") if hasattr(variable, "path")
                          else str(variable.name).replace("/", "_").replace(":", "_"))
                factors.append(self.add_variable(shape=(size, size) if dense else (size,), dtype=variable.dtype,
                                                 name=f"{prefix}_q_{side}"))
            self._factors.append(factors)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)  # the preconditioner mixes rows
        index = self._get_variable_index(variable)
        shapes, dense = self._layout(variable)
        g = tf.reshape(tf.cast(gradient, dtype), (shapes[0], shapes[1] or 1))
        momentum, variables = self._momentums[index], self._factors[index]
        probe_key, coin_key = draw_keys(self.seed, index)
        step = tf.cast(self.iterations, tf.int64)

        count = len(variables)

        def pad(fs):  # Q_R is None for a vector
            return tuple(fs) + (None,) * (2 - count)

        stored = tuple(tf.convert_to_tensor(q) for q in variables)
        init_scale = tf.constant(self.preconditioner_init_scale, dtype)
        # A zero corner marks a Q never initialised (an initialised one never reaches 0 exactly), so a
        # variable whose first gradient comes late is initialised from that gradient. A select, not a
        # tf.cond: with a model's ~100 variables the conds doubled the time to build the training graph.
        fresh = tf.equal(tf.reshape(stored[0], [-1])[0], 0)
        initial = initial_factors(shapes, dense, g, init_scale)
        factors = pad(tf.where(fresh, first, kept) for first, kept in zip(initial, stored))

        m = self.beta_1 * tf.reshape(tf.convert_to_tensor(momentum), g.shape) + (1.0 - self.beta_1) * g
        h = m / (1.0 - tf.pow(tf.constant(self.beta_1, dtype), tf.cast(step + 1, dtype)))
        lr_p = tf.constant(self.preconditioner_lr, dtype)

        def fitted():
            v = probes(tf.constant([probe_key], tf.int64), step, tuple(g.shape), dtype)[0]
            return update_preconditioner(factors, dense, h, v, lr_p)[:count]

        if self.preconditioner_update_probability >= 1.0:
            new = pad(fitted())
        else:
            coin = update_coins(tf.constant([coin_key], tf.int64), step, dtype)[0]
            new = pad(tf.cond(coin < self.preconditioner_update_probability, fitted, lambda: factors[:count]))
        u = clip_rms(precondition(new, dense, h))

        self.assign(momentum, tf.reshape(m, momentum.shape))
        for q, value in zip(variables, new):
            self.assign(q, value)
        self.assign_sub(variable, tf.cast(learning_rate, dtype) * tf.reshape(u, variable.shape))

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, preconditioner_lr=self.preconditioner_lr,
                      preconditioner_update_probability=self.preconditioner_update_probability,
                      max_size_triangular=self.max_size_triangular,
                      preconditioner_init_scale=self.preconditioner_init_scale, seed=self.seed)
        return config


# -- the engine optimizer -----------------------------------------------------------------------------

class EnginePSGDKron(FunctionalOptimizer):
    """S independent PSGD-Kron runs on the engine's ``[S, n]`` variable: one Q per seed, batched ``[S, n, n]``.

    Each seed's parameter vector is a 1-D tensor with one factor (dense when
    n ≤ max_size_triangular, else diagonal). Every float hyperparameter may be a
    list with one value per seed; scalars are the same columns repeated, so a
    seed's numbers do not depend on the other seeds' values. With p < 1 a seed
    whose coin says no keeps its Q; the fitting step is skipped (``tf.cond``)
    only when no seed updates.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, preconditioner_lr=0.1, preconditioner_update_probability=1.0,
                 max_size_triangular=8192, preconditioner_init_scale=0.0):
        check_hyperparameters(learning_rate, beta_1, preconditioner_lr, preconditioner_update_probability,
                              max_size_triangular, preconditioner_init_scale)
        self.hparams = dict(learning_rate=learning_rate, beta_1=beta_1, preconditioner_lr=preconditioner_lr,
                            preconditioner_update_probability=preconditioner_update_probability,
                            preconditioner_init_scale=preconditioner_init_scale)
        self.max_size_triangular = int(max_size_triangular)
        always = all(float(p) >= 1.0 for p in (preconditioner_update_probability
                                               if is_per_seed(preconditioner_update_probability)
                                               else [preconditioner_update_probability]))
        self.columns = None

        def init(n, seeds, dtype):
            self.columns = {k: seed_values(v, len(seeds), k) for k, v in self.hparams.items()}
            keys = [draw_keys(s) for s in seeds]
            self.probe_keys = tf.constant([k[0] for k in keys], tf.int64)
            self.coin_keys = tf.constant([k[1] for k in keys], tf.int64)
            self.dense = (n <= self.max_size_triangular, False)
            q_shape = [len(seeds), n, n] if self.dense[0] else [len(seeds), n]
            return {"count": tf.zeros([], tf.int64), "momentum": tf.zeros([len(seeds), n], dtype),
                    "q": tf.zeros(q_shape, dtype)}

        def update(state, grad, params, oracle):
            dtype = grad.dtype
            col = {k: tf.constant(v, dtype) for k, v in self.columns.items()}
            count, n = state["count"], grad.shape[-1]
            g = grad[..., None]  # [S, n, 1]: one factor
            q = tf.cond(tf.equal(count, 0),
                        lambda: initial_factors((n, None), self.dense, g, col["preconditioner_init_scale"])[0],
                        lambda: state["q"])
            b1 = col["beta_1"][:, None]
            m = b1 * state["momentum"] + (1.0 - b1) * grad
            h = (m / (1.0 - tf.pow(b1, tf.cast(count + 1, dtype))))[..., None]

            def fitted():
                v = probes(self.probe_keys, count, (n, 1), dtype)
                return update_preconditioner((q, None), self.dense, h, v, col["preconditioner_lr"], self.substitute)[0]

            if always:
                q_new = fitted()
            else:
                go = update_coins(self.coin_keys, count, dtype) < col["preconditioner_update_probability"]
                mask = go[:, None, None] if self.dense[0] else go[:, None]
                q_new = tf.cond(tf.reduce_any(go), lambda: tf.where(mask, fitted(), q), lambda: q)
            u = clip_rms(precondition((q_new, None), self.dense, h))[..., 0]
            return col["learning_rate"][:, None] * u, {"count": count + 1, "momentum": m, "q": q_new}

        super().__init__("psgd_kron", init, update)

    def build(self, params, seeds):
        self.substitute = "GPU" not in str(params.device).upper()  # XLA's solve is slow on CPU (``_substitution``)
        super().build(params, seeds)


def engine_psgd_kron(learning_rate=0.001, beta_1=0.9, preconditioner_lr=0.1, preconditioner_update_probability=1.0,
                     max_size_triangular=8192, preconditioner_init_scale=0.0):
    """PSGD-Kron on the engine's ``[S, n]`` variable (``EnginePSGDKron``); float settings may be per-seed lists."""
    return EnginePSGDKron(learning_rate, beta_1, preconditioner_lr, preconditioner_update_probability,
                          max_size_triangular, preconditioner_init_scale)
