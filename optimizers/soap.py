"""SOAP (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's preconditioner.

A parameter is viewed as a matrix G (a × b). Shampoo's statistics

    L ← βs·L + (1 − βs)·G Gᵀ,    R ← βs·R + (1 − βs)·Gᵀ G

give the eigenbases Q_L, Q_R, and Adam runs on the rotated gradient:

    M ← β1·M + (1 − β1)·G                       (kept in the original basis, rotated each step)
    G' = Q_Lᵀ G Q_R,  M' = Q_Lᵀ M Q_R,  V ← β2·V + (1 − β2)·G'²
    θ ← θ − lr · Q_L [M̂' / (√V̂ + ε)] Q_Rᵀ      (M̂, V̂: Adam's bias corrections at step t)

then L and R take in G (after the step, so a gradient never rotates itself). Every
``precondition_frequency`` steps the bases are refreshed by one step of power
iteration, Q ← QR(L Q) with the columns of L Q first ordered by the estimated
eigenvalues diag(Qᵀ L Q) (descending) and V's rows/columns re-ordered with them.

Choices (the paper's code leaves them open or makes them otherwise):

- ``shampoo_beta`` is a hyperparameter of its own, default 0.95: what the paper's code uses
  when it is unset (its β2 default); the tuner searches it apart from β2.
- The first step. The paper's code only initialises the statistics there and skips the
  update. Here the bases start as the identity, so step 1 is Adam's first step; its
  gradient then initialises L, R, the first full eigendecomposition, and V in that basis,
  V = (1 − β2)(Q_Lᵀ G Q_R)², the second moment step 1 would have left there. One call
  of ``apply_gradients`` must move the variables (Keras's contract), and Adam on a gradient
  rotated into its own eigenbasis would be one-hot up to rounding, which ε = 1e-8 turns
  into unit steps along rounding noise in float32.
- Ties. Early on L is rank-deficient, so its null space has no defined eigenbasis and
  the trajectory would depend on which one eigh returns (LAPACK's, XLA's, another
  machine's). Every decomposition and power step therefore sees L + δ·(tr L / k)·diag(1..k)/k,
  δ = 1e-4: distinct eigenvalues with gaps set by the statistic's own scale, and a change
  far below its sampling noise (relative 1e-4 of the mean eigenvalue).
- A rank ≥ 2 tensor is the matrix [prod(shape[:-1]), shape[-1]] (a conv kernel
  [kh, kw, c_in, c_out] is [kh·kw·c_in, c_out]); a 1-D tensor is [n, 1], preconditioned
  on its only side when ``precondition_1d`` (else it is Adam), a scalar is Adam. A side
  longer than ``max_precond_dim`` (default 2048: a factor and its basis cost 2·k² numbers,
  32 MiB in float32 at k = 2048) or of length 1 is not rotated.
- The Keras class decomposes with ``tf.linalg.eigh`` and ``tf.linalg.qr`` (LAPACK's, or XLA's
  under ``jit_compile``). In float32 the tie-breaker's gaps (~δ/k² of ‖L‖) are near rounding,
  so a model run reproduces to float32 accuracy, not bit for bit across implementations.

On the engine one seed's parameters are one 1-D vector of n numbers: its own n × n L and
Q_L, batched over the seeds as [S, n, n]. XLA's eigh on CPU stops at ~1e-7 of the matrix
norm, too coarse to resolve the tie-broken null space, so the engine's first basis comes
from a cyclic Jacobi method with per-pair thresholds (exact no-ops once a seed has
converged, so a seed's result does not depend on the other seeds), and its QR from
Gram-Schmidt applied twice, 2-3x faster than XLA's Householder QR on CPU.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from lodo.functional import FunctionalOptimizer, is_per_seed, seed_values

TIE_BREAK = 1e-4  # δ above
JACOBI_MAX_SWEEPS = 30  # cyclic Jacobi converges in 6-15 sweeps at n ≤ 100


# --- the basis, shared by both front ends (any leading batch dimensions) --------------------------

def tie_broken(stat):
    """stat + δ·(tr/k)·diag(1..k)/k; a zero statistic gets scale 1 (a defined basis even then)."""
    k = stat.shape[-1]
    trace = tf.linalg.trace(stat)
    scale = tf.where(trace > 0, trace / k, tf.ones_like(trace))
    ramp = tf.range(1, k + 1, dtype=stat.dtype) / k
    shift = (TIE_BREAK * scale)[..., None] * ramp
    return tf.linalg.set_diag(stat, tf.linalg.diag_part(stat) + shift)


def _columns(x, order):
    return tf.gather(x, order, axis=-1, batch_dims=order.shape.rank - 1)


def eigenbasis(stat, eigh=tf.linalg.eigh):
    """The eigenvectors of the tie-broken statistic, by decreasing eigenvalue."""
    values, vectors = eigh(tie_broken(stat))
    return _columns(vectors, tf.argsort(values, direction="DESCENDING", stable=True))


def power_step(stat, basis, orthonormalize):
    """One power-iteration step, Q ← QR(L Q), columns first sorted by diag(Qᵀ L Q); and that order."""
    product = tf.matmul(tie_broken(stat), basis)
    order = tf.argsort(tf.reduce_sum(basis * product, axis=-2), direction="DESCENDING", stable=True)
    return orthonormalize(_columns(product, order)), order


def qr_columns(a):
    return tf.linalg.qr(a)[0]


def gram_schmidt_columns(a):
    """Q of a = QR for a batch [S, k, k], column by column, each projected out twice (CGS2)."""
    k = a.shape[-1]
    rows = tf.range(k)
    columns = tf.linalg.matrix_transpose(a)  # row j: column j of a

    def body(j, q_rows):
        v = tf.gather(columns, j, axis=-2)
        for _ in range(2):  # unfilled rows are zero, so they project out nothing
            v -= tf.linalg.matvec(q_rows, tf.linalg.matvec(q_rows, v), transpose_a=True)
        v /= tf.norm(v, axis=-1, keepdims=True)
        return j + 1, tf.where((rows == j)[:, None], v[..., None, :], q_rows)

    _, q_rows = tf.while_loop(lambda j, _: j < k, body, (tf.constant(0), tf.zeros_like(columns)))
    return tf.linalg.matrix_transpose(q_rows)


def _round_robin(k: int):
    """Pairings of 0..m-1 (m = k rounded up to even) in m-1 rounds, each index once per round."""
    m = k + k % 2
    ring = list(range(1, m))
    first, second = [], []
    for _ in range(m - 1):
        order = [0] + ring
        first.append(order[:m // 2])
        second.append(order[::-1][:m // 2])
        ring = ring[-1:] + ring[:-1]
    first, second = np.array(first, np.int32), np.array(second, np.int32)
    partner, place = np.zeros((m - 1, m), np.int32), np.zeros((m - 1, m), np.int32)
    for r in range(m - 1):
        partner[r, first[r]], partner[r, second[r]] = second[r], first[r]
        place[r, np.concatenate([first[r], second[r]])] = np.arange(m)
    return m, first, second, partner, place


def jacobi_eigh(a):
    """Eigenvalues (unsorted) and eigenvectors of a batch [S, k, k] of symmetric matrices.

    Parallel cyclic Jacobi: each round rotates m/2 disjoint pairs (p, q) to zero a_pq. A pair
    with |a_pq| ≤ eps·√|a_pp·a_qq| is left alone (the classical threshold, which also gives
    small eigenvalues to high relative accuracy); the loop ends after a sweep without rotations.
    """
    k = a.shape[-1]
    m, first, second, partner, place = _round_robin(k)
    if m != k:  # an isolated zero row and column: never rotated
        a = tf.pad(a, [[0, 0], [0, 1], [0, 1]])
    batch, dtype = tf.shape(a)[0], a.dtype
    eps = float(np.finfo(dtype.as_numpy_dtype).eps)
    flat_pq = tf.constant(first * m + second)
    first, second, partner, place = (tf.constant(x) for x in (first, second, partner, place))

    def rotate(r, b, v, rotated):
        diagonal = tf.linalg.diag_part(b)
        app, aqq = tf.gather(diagonal, first[r], axis=1), tf.gather(diagonal, second[r], axis=1)
        apq = tf.gather(tf.reshape(b, [batch, m * m]), flat_pq[r], axis=1)
        needed = tf.abs(apq) > eps * tf.sqrt(tf.abs(app * aqq))
        tau = (aqq - app) / (2 * tf.where(needed, apq, tf.ones_like(apq)))
        t = tf.where(tau >= 0, tf.ones_like(tau), -tf.ones_like(tau)) / (tf.abs(tau) + tf.sqrt(1 + tau * tau))
        c = tf.where(needed, 1 / tf.sqrt(1 + t * t), tf.ones_like(t))
        s = tf.where(needed, t * c, tf.zeros_like(t))
        # Row p becomes c·row_p − s·row_q, row q becomes s·row_p + c·row_q (then the same for columns).
        cv = tf.gather(tf.concat([c, c], 1), place[r], axis=1)
        sv = tf.gather(tf.concat([-s, s], 1), place[r], axis=1)
        b = cv[:, :, None] * b + sv[:, :, None] * tf.gather(b, partner[r], axis=1)
        b = b * cv[:, None, :] + tf.gather(b, partner[r], axis=2) * sv[:, None, :]
        v = v * cv[:, None, :] + tf.gather(v, partner[r], axis=2) * sv[:, None, :]
        return r + 1, b, v, tf.logical_or(rotated, tf.reduce_any(needed))

    def sweep(i, b, v, _):
        _, b, v, rotated = tf.while_loop(lambda r, *_: r < m - 1, rotate, (0, b, v, tf.constant(False)))
        return i + 1, b, v, rotated

    start = (0, a, tf.eye(m, batch_shape=[batch], dtype=dtype), tf.constant(True))
    _, b, v, _ = tf.while_loop(lambda i, b, v, rotated: tf.logical_and(rotated, i < JACOBI_MAX_SWEEPS), sweep, start)
    return tf.linalg.diag_part(b)[:, :k], v[:, :k, :k]


# --- hyperparameters ---------------------------------------------------------------------------

def _check(prefix, learning_rate, beta_1, beta_2, shampoo_beta, epsilon, precondition_frequency, max_precond_dim,
           precondition_1d, per_seed):
    def each(key, value):
        if is_per_seed(value) and not per_seed:
            raise ValueError(f"{prefix}{key} must be one number, got {value!r}")
        for v in (value if is_per_seed(value) else [value]):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{prefix}{key} must be a finite number, got {v!r}")
            yield float(v)

    if isinstance(learning_rate, (int, float, list, tuple)):  # a schedule, a callable: Keras's to check
        if any(v <= 0 for v in each("learning_rate", learning_rate)):
            raise ValueError(f"{prefix}learning_rate must be > 0, got {learning_rate!r}")
    for key, value in (("beta_1", beta_1), ("beta_2", beta_2), ("shampoo_beta", shampoo_beta)):
        if not all(0.0 <= v < 1.0 for v in each(key, value)):
            raise ValueError(f"{prefix}{key} must be in [0, 1), got {value!r}")
    if any(v <= 0 for v in each("epsilon", epsilon)):
        raise ValueError(f"{prefix}epsilon must be > 0, got {epsilon!r}")
    for key, value in (("precondition_frequency", precondition_frequency), ("max_precond_dim", max_precond_dim)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
            raise ValueError(f"{prefix}{key} must be an integer >= 1 (one for all seeds), got {value!r}")
    if not isinstance(precondition_1d, (bool, np.bool_)):
        raise ValueError(f"{prefix}precondition_1d must be true or false, got {precondition_1d!r}")


def _adam_direction(m_rotated, v, t, beta_1, beta_2, epsilon):
    """M̂'/(√V̂ + ε) with Adam's bias corrections at step t."""
    m_hat = m_rotated / (1 - tf.pow(beta_1, t))
    v_hat = v / (1 - tf.pow(beta_2, t))
    return m_hat / (tf.sqrt(v_hat) + epsilon)


# --- the Keras optimizer -----------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="lodo_baselines")
class SOAP(keras.optimizers.Optimizer):
    """SOAP for ``model.compile``/``model.fit``, ``apply_gradients`` loops and ``tf.distribute``.

    Per variable (Keras's per-variable ``update_step``, which all-reduces gradients across
    replicas first): Adam's moments, a step count of its own (a variable that misses steps
    keeps its bias corrections and refresh schedule), and per rotated side a statistic and
    its basis. Keras's own keywords (``weight_decay``: decoupled, ``clipnorm``, ``use_ema``,
    …) work as for any Keras optimizer.
    """

    def __init__(self, learning_rate=3e-3, beta_1=0.95, beta_2=0.95, shampoo_beta=0.95, epsilon=1e-8,
                 precondition_frequency=10, max_precond_dim=2048, precondition_1d=True, name=None, **kwargs):
        _check("SOAP ", learning_rate, beta_1, beta_2, shampoo_beta, epsilon, precondition_frequency,
               max_precond_dim, precondition_1d, per_seed=False)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1, self.beta_2, self.shampoo_beta = float(beta_1), float(beta_2), float(shampoo_beta)
        self.epsilon = float(epsilon)
        self.precondition_frequency, self.max_precond_dim = int(precondition_frequency), int(max_precond_dim)
        self.precondition_1d = bool(precondition_1d)

    def _view(self, shape):
        """(rows, columns, rotate rows, rotate columns) of a variable's matrix view."""
        shape = [int(d) for d in shape]
        rows, cols = (math.prod(shape[:-1]), shape[-1]) if len(shape) >= 2 else (shape[0] if shape else 1, 1)
        fits = lambda d: 1 < d <= self.max_precond_dim
        return rows, cols, fits(rows) and (len(shape) >= 2 or self.precondition_1d), fits(cols) and len(shape) >= 2

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._moments, self._counts, self._left, self._right = [], [], [], []
        for variable in variables:
            rows, cols, left, right = self._view(variable.shape)
            dtype = _state_dtype(variable.dtype)
            prefix = (variable.path if hasattr(variable, "path") else str(variable.name)).replace("/", "_")
            prefix = prefix.replace(":", "_")
            add = lambda shape, name, initializer="zeros", dtype=dtype: self.add_variable(
                shape, initializer=initializer, dtype=dtype, name=f"{prefix}_{name}")
            self._moments.append((add([rows, cols], "momentum"), add([rows, cols], "velocity")))
            self._counts.append(add([], "count", dtype="int64"))
            self._left.append((add([rows, rows], "left_statistic"), add([rows, rows], "left_basis", "identity"))
                              if left else None)
            self._right.append((add([cols, cols], "right_statistic"), add([cols, cols], "right_basis", "identity"))
                               if right else None)

    def update_step(self, gradient, variable, learning_rate):
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)  # rows without a gradient still see g = 0
        index = self._get_variable_index(variable)
        m_var, v_var = self._moments[index]
        count_var, left, right = self._counts[index], self._left[index], self._right[index]
        dtype = m_var.dtype
        g = tf.reshape(tf.cast(gradient, dtype), m_var.shape)
        t = tf.cast(count_var + 1, dtype)
        ql = None if left is None else tf.convert_to_tensor(left[1])
        qr = None if right is None else tf.convert_to_tensor(right[1])

        def rotate(x, ql, qr):
            x = x if ql is None else tf.matmul(ql, x, transpose_a=True)
            return x if qr is None else tf.matmul(x, qr)

        m = self.beta_1 * tf.convert_to_tensor(m_var) + (1.0 - self.beta_1) * g
        v = self.beta_2 * tf.convert_to_tensor(v_var) + (1.0 - self.beta_2) * tf.square(rotate(g, ql, qr))
        direction = _adam_direction(rotate(m, ql, qr), v, t, tf.constant(self.beta_1, dtype),
                                    tf.constant(self.beta_2, dtype), tf.constant(self.epsilon, dtype))
        direction = direction if ql is None else tf.matmul(ql, direction)
        direction = direction if qr is None else tf.matmul(direction, qr, transpose_b=True)
        self.assign(m_var, m)
        self.assign_sub(variable, tf.cast(tf.cast(learning_rate, dtype) * tf.reshape(direction, variable.shape),
                                          variable.dtype))
        if left is None and right is None:
            self.assign(v_var, v)
            self.assign_add(count_var, 1)
            return

        b = self.shampoo_beta
        average = lambda side, outer: None if side is None else b * tf.convert_to_tensor(side[0]) + (1 - b) * outer
        stats = [average(left, tf.matmul(g, g, transpose_b=True)), average(right, tf.matmul(g, g, transpose_a=True))]

        def first():  # the first eigenbases, and V as step 1 would have left it in them
            ql_new = None if left is None else eigenbasis(stats[0])
            qr_new = None if right is None else eigenbasis(stats[1])
            return _present(ql_new, qr_new, (1.0 - self.beta_2) * tf.square(rotate(g, ql_new, qr_new)))

        def refresh():
            v_new, ql_new, qr_new = v, ql, qr
            if left is not None:
                ql_new, order = power_step(stats[0], ql, qr_columns)
                v_new = tf.gather(v_new, order, axis=0)
            if right is not None:
                qr_new, order = power_step(stats[1], qr, qr_columns)
                v_new = tf.gather(v_new, order, axis=1)
            return _present(ql_new, qr_new, v_new)

        count = tf.convert_to_tensor(count_var)
        due = tf.logical_and(count > 0, (count + 1) % self.precondition_frequency == 0)
        new = tf.cond(count == 0, first, lambda: tf.cond(due, refresh, lambda: _present(ql, qr, v)))
        for side, stat, key in ((left, stats[0], "left"), (right, stats[1], "right")):
            if side is not None:
                self.assign(side[0], stat)
                self.assign(side[1], new[key])
        self.assign(v_var, new["v"])
        self.assign_add(count_var, 1)

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, shampoo_beta=self.shampoo_beta, epsilon=self.epsilon,
                      precondition_frequency=self.precondition_frequency, max_precond_dim=self.max_precond_dim,
                      precondition_1d=self.precondition_1d)
        return config


def _state_dtype(dtype):
    """float64 stays float64; anything narrower is kept (and decomposed) in float32."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def _present(left, right, v):
    """A ``tf.cond`` branch's result: the bases that exist, and V."""
    return {k: x for k, x in (("left", left), ("right", right), ("v", v)) if x is not None}


# --- the multi-seed engine ---------------------------------------------------------------------

class SOAPEngine(FunctionalOptimizer):
    """SOAP on the engine's [S, n] variable: each seed's vector is a 1-D parameter with its own n × n factor.

    Float hyperparameters may be per-seed lists; they enter as [S, 1] columns, so one code
    path serves scalar and per-seed runs alike and seed i runs exactly its scalar run.
    """

    def __init__(self, learning_rate, beta_1, beta_2, shampoo_beta, epsilon, precondition_frequency,
                 max_precond_dim, precondition_1d):
        self.hparams = dict(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, shampoo_beta=shampoo_beta,
                            epsilon=epsilon)
        self.precondition_frequency, self.max_precond_dim = int(precondition_frequency), int(max_precond_dim)
        self.precondition_1d = bool(precondition_1d)
        self.columns = None
        super().__init__("soap", self._init, self._update)

    def rotates(self, n: int) -> bool:
        return self.precondition_1d and 1 < n <= self.max_precond_dim

    def _init(self, n, seeds, dtype):
        self.columns = {k: seed_values(v, len(seeds), k)[:, None] for k, v in self.hparams.items()}
        zeros = tf.zeros([len(seeds), n], dtype)
        state = dict(count=tf.zeros([], tf.int64), m=zeros, v=zeros)
        if self.rotates(n):
            state.update(stat=tf.zeros([len(seeds), n, n], dtype),
                         basis=tf.eye(n, batch_shape=[len(seeds)], dtype=dtype))
        return state

    def _update(self, state, grad, params, oracle):
        dtype = grad.dtype
        h = {k: tf.constant(v, dtype) for k, v in self.columns.items()}
        count = state["count"]
        t = tf.cast(count + 1, dtype)
        rotated = "basis" in state
        q = state.get("basis")
        rotate = (lambda x, q: tf.linalg.matvec(q, x, transpose_a=True)) if rotated else (lambda x, q: x)
        m = h["beta_1"] * state["m"] + (1 - h["beta_1"]) * grad
        v = h["beta_2"] * state["v"] + (1 - h["beta_2"]) * tf.square(rotate(grad, q))
        direction = _adam_direction(rotate(m, q), v, t, h["beta_1"], h["beta_2"], h["epsilon"])
        step = h["learning_rate"] * (tf.linalg.matvec(q, direction) if rotated else direction)
        new = dict(count=count + 1, m=m, v=v)
        if not rotated:
            return step, new
        bs = h["shampoo_beta"][..., None]
        stat = bs * state["stat"] + (1 - bs) * (grad[:, :, None] * grad[:, None, :])

        def first():
            basis = eigenbasis(stat, jacobi_eigh)
            return basis, (1 - h["beta_2"]) * tf.square(rotate(grad, basis))

        def refresh():
            basis, order = power_step(stat, q, gram_schmidt_columns)
            return basis, tf.gather(v, order, axis=1, batch_dims=1)

        due = tf.logical_and(count > 0, (count + 1) % self.precondition_frequency == 0)
        basis, v = tf.cond(count == 0, first, lambda: tf.cond(due, refresh, lambda: (q, v)))
        new.update(v=v, stat=stat, basis=basis)
        return step, new


def engine_soap(learning_rate=3e-3, beta_1=0.95, beta_2=0.95, shampoo_beta=0.95, epsilon=1e-8,
                precondition_frequency=10, max_precond_dim=2048, precondition_1d=True):
    """SOAP for the multi-seed engine; any float hyperparameter may be a list with one value per seed."""
    _check("optimizer.", learning_rate, beta_1, beta_2, shampoo_beta, epsilon, precondition_frequency,
           max_precond_dim, precondition_1d, per_seed=True)
    return SOAPEngine(learning_rate, beta_1, beta_2, shampoo_beta, epsilon, precondition_frequency, max_precond_dim,
                      precondition_1d)
