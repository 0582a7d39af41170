"""The fused, layer-by-layer form of LODO's one update, for one model (the Keras optimizers' core).

This is ``lodo.algorithm.update`` with ``lodo.preconditioners.BlockPermutation`` and one seed,
not another algorithm: the same products and sums, fused in another order, so the numbers agree
up to rounding (test_lodo_scale.py checks that the two follow the same trajectory, step for step,
under every memory plan and for every variant of ``lodo.variants`` that runs here). It only
reorganises the work for models of 10⁵–10⁷ parameters, where LODO's own state (φ and its
meta-Adam moments, ≈ 1.5 KB per parameter) dwarfs the model:

- Every layer's blocks φ_i, meta-Adam moments m_i, v_i and permutation are variables of their
  own, and the compiled programs update them in place (XLA aliases an updated variable to its
  input buffer), so a step never holds a second copy of the state.
- The hypergradient is never held whole. Going down the layers, layer i's hypergradient is
  formed, fed to the meta-optimizer together with m_i and v_i, and dropped; the cotangent that
  flows on to layer i − 1 is computed from layer i's old blocks, read before they are overwritten.
- The layers are processed in segments of ``Plan.segment`` layers, one XLA program each, from
  the top segment down. A segment's program pushes (m_t, g) through the old blocks of every
  layer below it again and keeps only its own layers' inputs, so a step holds the inputs of
  one segment instead of all N layers, at the price of recomputing lower layers.
- Permutations are applied as scatters: P x = x[p] scatters x through p⁻¹, and Pᵀu scatters u
  through p. XLA on CPU runs a scatter as a loop of its own, while it fuses a gather into the
  layers around it and then loads each gathered element once per use (about three times
  slower here). The lean plan keeps only p⁻¹ and rebuilds p by scattering 0, 1, …, ñ − 1
  through p⁻¹ where Pᵀ is needed (``Plan.inverse``).

An in-place update inside one XLA program is only free if every other read of the old value
is ordered before the write; otherwise XLA copies the variable first. The programs therefore
tie each overwrite to the results of those reads (``_after``), and build scratch buffers from
data rather than as constants (see ``_scatter``). ``LayerwiseCore.compiled_memory`` reads the
resulting scratch sizes from XLA's buffer assignment.

``Plan.choose`` keeps everything (one segment, both permutation directions) while that costs
little memory, which is also the fastest layout, and switches to the lean one for big models.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from lodo import meta_optimizers
from lodo.preconditioners import BlockNetwork

# Below this many bytes of optional memory (the second permutation direction plus every layer's inputs),
# the fast layout is used; ResNet-18 (11.2M parameters) needs ~4 GB for it, the PixelCNN 36 MB.
FAST_LAYOUT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Plan:
    """How a step trades memory for time: one program per ``segment`` layers, which keeps those
    layers' inputs (``segment == num_layers``: one program, nothing recomputed), and ``inverse``
    keeps p as well as p⁻¹ (otherwise p is rebuilt from p⁻¹ where it is used)."""

    segment: int
    inverse: bool

    def __post_init__(self):
        if not isinstance(self.segment, (int, np.integer)) or isinstance(self.segment, bool) or self.segment < 1:
            raise ValueError(f"LODO plan segment must be a positive integer, got {self.segment!r}")

    @staticmethod
    def fast(network: BlockNetwork) -> "Plan":
        return Plan(segment=network.num_layers, inverse=True)

    @staticmethod
    def lean(network: BlockNetwork) -> "Plan":
        # A segment's program holds 2·segment + ~9 vectors of length ñ and the step pushes
        # (m, g) through N(N/segment + 1)/2 layers: 2 is within ~2 vectors of the minimum
        # (segment 1) at less than 60% of its recomputation.
        return Plan(segment=min(2, network.num_layers), inverse=False)

    @staticmethod
    def choose(network: BlockNetwork, itemsize: int, plan="auto") -> "Plan":
        """``plan``: "auto" (fast while its extra memory is below ``FAST_LAYOUT_MAX_BYTES``),
        "fast", "lean", or a ``Plan``."""
        if isinstance(plan, Plan):
            return plan
        if plan == "fast":
            return Plan.fast(network)
        if plan == "lean":
            return Plan.lean(network)
        if plan == "auto":
            extra = network.num_layers * network.padded * (4 + 2 * itemsize)
            return Plan.fast(network) if extra <= FAST_LAYOUT_MAX_BYTES else Plan.lean(network)
        raise ValueError(f"LODO plan must be 'auto', 'fast', 'lean' or a layerwise.Plan, got {plan!r}")

    def segments(self, num_layers: int) -> list[tuple[int, int]]:
        """``[(start, stop), …]`` in layer order; the last one may be shorter."""
        return [(lo, min(lo + self.segment, num_layers)) for lo in range(0, num_layers, self.segment)]


@dataclass
class LayerState:
    """LODO's variables, one per layer and kind (plain ``tf.Variable``s, or one device's copies)."""

    inverses: list  # N × [ñ] int32 p_i⁻¹, where P_i x = x[p_i]
    perms: list  # N × [ñ] int32 p_i, or [] when the plan does not keep them
    iota: list  # [0, 1, …, ñ − 1] (int32) when p_i is rebuilt from p_i⁻¹, else []
    blocks: list  # N × [ñ/k, k, k]: φ
    first: list  # N × meta-Adam first moments of φ_i ([] for SGD)
    second: list  # N × meta-Adam second moments
    count: list  # [meta-Adam step count] ([] for SGD)
    momentum: list  # [m_t, [n]]

    FIELDS = ("inverses", "perms", "iota", "blocks", "first", "second", "count", "momentum")

    def flatten(self) -> list:
        return [v for name in self.FIELDS for v in getattr(self, name)]

    def unflatten(self, values) -> "LayerState":
        """The same structure over ``values`` (e.g. another device's copies, in ``flatten`` order)."""
        values, out = list(values), {}
        for name in self.FIELDS:
            size = len(getattr(self, name))
            out[name], values = values[:size], values[size:]
        return LayerState(**out)


def create_state(add_variable, network: BlockNetwork, plan: Plan, rng: np.random.Generator, dtype,
                 meta_optimizer) -> LayerState:
    """LODO's variables, made one layer at a time from the draws of ``BlockNetwork.stream``.

    ``add_variable(shape, initializer, dtype, name)`` is the Keras optimizer's; each
    initializer hands over one layer's array, so no step of the construction holds a second
    copy of φ (or a float64 one).
    """
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype
    state = LayerState([], [], [], [], [], [], [], [])

    def variable(value, name, kind=None):
        return add_variable(shape=value.shape, initializer=lambda shape, dtype: value, dtype=kind or dtype, name=name)

    for kind, i, value in network.stream(rng, np_dtype):
        if kind == "perm":
            inverse = np.empty_like(value)
            inverse[value] = np.arange(len(value), dtype=value.dtype)
            state.inverses.append(variable(inverse, f"lodo_inverse_perm_{i}", "int32"))
            del inverse
            if plan.inverse:
                state.perms.append(variable(value, f"lodo_perm_{i}", "int32"))
        else:
            state.blocks.append(variable(value, f"lodo_blocks_{i}"))
        del value
    if isinstance(meta_optimizer, meta_optimizers.Adam):
        shape = (network.num_blocks, network.block_size, network.block_size)
        for i in range(network.num_layers):
            state.first.append(add_variable(shape=shape, initializer="zeros", dtype=dtype, name=f"lodo_adam_m_{i}"))
        for i in range(network.num_layers):
            state.second.append(add_variable(shape=shape, initializer="zeros", dtype=dtype, name=f"lodo_adam_v_{i}"))
        state.count.append(add_variable(shape=(), initializer="zeros", dtype="int64", name="lodo_adam_count"))
    elif not isinstance(meta_optimizer, meta_optimizers.SGD):
        raise ValueError(f"the layerwise LODO core supports the adam and sgd meta-optimizers, got {meta_optimizer!r}")
    state.momentum.append(add_variable(shape=(network.n,), initializer="zeros", dtype=dtype, name="lodo_momentum"))
    if not plan.inverse:
        # A variable rather than tf.range: TensorFlow folds a range into a constant of the program,
        # one copy per use, kept in the compiled executable (and several more while compiling).
        state.iota.append(variable(np.arange(network.padded, dtype=np.int32), "lodo_iota", "int32"))
    return state


# --- the arithmetic on one layer's [ñ] vectors (viewed as [ñ/k, k]) ------------------------------

def _times(block: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """(B y)[b, a] = Σ_j B[b, a, j] y[b, j], as k explicit terms so that XLA makes one elementwise loop."""
    k = block.shape[-1]
    y = tf.reshape(y, [-1, 1, k])
    out = block[:, :, 0] * y[:, :, 0]
    for j in range(1, k):
        out = out + block[:, :, j] * y[:, :, j]
    return tf.reshape(out, [-1])


def _times_transposed(block: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """(Bᵀ u)[b, j] = Σ_a B[b, a, j] u[b, a]."""
    k = block.shape[-1]
    u = tf.reshape(u, [-1, k, 1])
    out = block[:, 0, :] * u[:, 0, :]
    for a in range(1, k):
        out = out + block[:, a, :] * u[:, a, :]
    return tf.reshape(out, [-1])


def _pair_times(block: tf.Tensor, y: tf.Tensor, transposed: bool = False) -> tf.Tensor:
    """``_times`` (or ``_times_transposed``) on both columns of a pair packed as a complex vector.

    The m and g paths travel together as real and imaginary parts: one scatter moves both,
    and the multiply reads each block once for both (packing and unpacking are exact).
    """
    times = _times_transposed if transposed else _times
    return tf.complex(times(block, tf.math.real(y)), times(block, tf.math.imag(y)))


def _after(x: tf.Tensor, *tensors: tf.Tensor) -> tf.Tensor:
    """``x``, computed only once the float ``tensors`` are: adds 0·t[0] (XLA folds 0·t for integers,
    not for floats).

    An in-place update of a variable must run after every other read of its old value; XLA
    copies the whole variable first unless the program's data flow puts those reads before
    the write. For finite values this changes nothing (x + 0 = x).
    """
    ties = [tf.math.real(tf.reshape(t, [-1])[0]) for t in tensors if t.dtype.is_floating or t.dtype.is_complex]
    if not ties:
        return x
    tie = tf.add_n([tf.cast(t, ties[0].dtype) for t in ties])
    zero = tf.zeros([], tie.dtype) * tie
    return x + tf.cast(zero, x.dtype)


def _scatter(index: tf.Tensor, x: tf.Tensor, *after: tf.Tensor) -> tf.Tensor:
    """out[index[j]] = x[j] (index is a permutation, so every entry is written), made once ``x``
    (and ``after``) exist.

    The buffer scattered into (its values are all overwritten) is filled with a zero computed
    from ``x``: TensorFlow folds ``zeros_like`` into a constant while compiling (one [ñ] tensor
    per scatter, gigabytes at ResNet scale), and XLA copies a constant buffer for each scatter
    and schedules all the copies at the start of the program.
    """
    zero = _after(tf.zeros([], x.dtype), x, *after)
    return tf.tensor_scatter_nd_update(tf.fill(tf.shape(x), zero), index[:, None], x)


_PROGRAMS: dict = {}  # (settings…, lo, hi) → the compiled program of that segment; see LayerwiseCore.__init__


class LayerwiseCore:
    """One LODO step on a ``LayerState`` as a few XLA programs; see the module docstring."""

    def __init__(self, network: BlockNetwork, plan: Plan, meta_optimizer, beta: float, dtype,
                 template: LayerState):
        self.network, self.plan, self.meta, self.beta = network, plan, meta_optimizer, beta
        self._template = template  # the structure of the state lists (any device's copies)
        self.dtype = tf.as_dtype(dtype)
        self.adam = isinstance(meta_optimizer, meta_optimizers.Adam)
        self.segments = plan.segments(network.num_layers)
        # A program depends only on these settings (the variables are its arguments), so cores that share
        # them share their compiled programs: a second optimizer of the same shape (the next seed, a
        # rebuilt model) does not compile again.
        key = (network, plan, meta_optimizer, beta, self.dtype,
               tuple(len(getattr(template, name)) for name in LayerState.FIELDS))
        compile = functools.partial(tf.function, jit_compile=True, autograph=False)
        for lo, hi in self.segments:
            if (*key, lo, hi) not in _PROGRAMS:
                _PROGRAMS[(*key, lo, hi)] = compile(functools.partial(self._segment_program, lo, hi))
        self._programs = [_PROGRAMS[(*key, lo, hi)] for lo, hi in self.segments]

    # -- permutations ------------------------------------------------------------------------------
    def _permute(self, state: LayerState, i: int, x: tf.Tensor) -> tf.Tensor:
        """P_i x = x[p_i]."""
        return _scatter(state.inverses[i], x)

    def _perm(self, state: LayerState, i: int, after: tf.Tensor) -> tf.Tensor:
        """p_i (P_iᵀ u scatters u through it): kept, or rebuilt from p_i⁻¹ once ``after`` exists."""
        if state.perms:
            return state.perms[i].read_value()
        return _scatter(state.inverses[i], _after(state.iota[0].read_value(), after), after)

    def _pad(self, v: tf.Tensor) -> tf.Tensor:
        return tf.pad(v, [[0, self.network.padded - self.network.n]])  # no constant of zeros to fold

    # -- the programs --------------------------------------------------------------------------------
    def _segment_program(self, lo, hi, state_vars, model_vars, grad, alpha, count, cotangent, mask=None,
                         active=None):
        """Layers [lo, hi): push (m_t, g) through the old blocks up to layer hi − 1, keeping the
        inputs of layers lo … hi − 1; then from layer hi − 1 down to lo form each layer's
        hypergradient, step its φ_i (and moments) in place, and carry the cotangent down with
        the old blocks. Returns the cotangent at the segment's input; the first segment then
        also updates m and applies G(φ_{t+1}) m_{t+1} to the model's variables.

        With ``mask`` (``[n]`` booleans) the step is restricted to those coordinates as in
        ``lodo.algorithm.update``; ``active`` (one bool per model variable) says which variables
        are written."""
        state = self._template.unflatten(state_vars)
        n = self.network.n
        momentum = state.momentum[0].read_value()
        kept = momentum if mask is None else tf.where(mask, momentum, tf.zeros_like(momentum))
        grad = grad if mask is None else tf.where(mask, grad, tf.zeros_like(grad))
        pair = tf.complex(self._pad(kept), self._pad(grad))  # the m path and the g path
        inputs, old = [], {}
        for i in range(hi):
            old[i] = state.blocks[i].read_value()
            x = self._permute(state, i, pair)
            if i >= lo:
                inputs.append(x)
            pair = _pair_times(old[i], x)
        if hi == self.network.num_layers:
            cotangent = tf.complex(tf.math.imag(pair), tf.math.real(pair))  # m path: A g̃, g path: A m̃
        new_blocks = {}
        k = self.network.block_size
        for i in reversed(range(lo, hi)):
            c, p = tf.reshape(cotangent, [-1, k, 1]), tf.reshape(inputs[i - lo], [-1, 1, k])
            # Σ over the two paths of cotangent ⊗ input
            hyper = -alpha * (tf.math.real(c) * tf.math.real(p) + tf.math.imag(c) * tf.math.imag(p))
            # Every read of the old φ_i (the cotangent below, the recomputed layer above) must come
            # before its overwrite; the scatters that follow those reads are the anchors.
            if i > 0:
                cotangent = _scatter(self._perm(state, i, cotangent), _pair_times(old[i], cotangent, transposed=True))
                hyper = _after(hyper, cotangent)
            if i + 1 < hi:
                hyper = _after(hyper, inputs[i + 1 - lo])
            if self.adam:
                meta_state = (count, (state.first[i].read_value(),), (state.second[i].read_value(),))
                (block,), (_, (first,), (second,)) = self.meta.update((old[i],), (hyper,), meta_state)
                state.first[i].assign(first)
                state.second[i].assign(second)
            else:
                (block,), _ = self.meta.update((old[i],), (hyper,), ())
            state.blocks[i].assign(block)
            new_blocks[i] = block
        if lo > 0:
            return cotangent

        # Steps 5 and 1 of Algorithm 1 with the new φ.
        beta = meta_optimizers.scalar(self.beta, self.dtype)
        momentum_new = beta * momentum + (1 - beta) * grad
        if mask is not None:
            momentum_new = tf.where(mask, momentum_new, momentum)  # a left-out coordinate keeps its m
        momentum = _after(momentum_new, inputs[0])  # after the read of m_t above
        state.momentum[0].assign(momentum)
        blocks = [new_blocks[i] if i in new_blocks else state.blocks[i].read_value()
                  for i in range(self.network.num_layers)]
        y = self._pad(momentum if mask is None else tf.where(mask, momentum, tf.zeros_like(momentum)))
        for i in range(self.network.num_layers):
            y = _times(blocks[i], self._permute(state, i, y))
        for i in reversed(range(self.network.num_layers)):
            y = _scatter(self._perm(state, i, y), _times_transposed(blocks[i], y))
        step = alpha * y[:n]
        sizes = [int(np.prod(v.shape)) for v in model_vars]
        for i, (var, piece) in enumerate(zip(model_vars, tf.split(step, sizes))):
            if active is None or active[i]:
                var.assign_sub(tf.cast(tf.reshape(piece, var.shape), var.dtype))
        return None

    # -- one step ------------------------------------------------------------------------------------
    def step(self, state: LayerState, grad: tf.Tensor, model_vars, alpha, active=None) -> None:
        """θ ← θ − G(φ_{t+1}) m_{t+1} on ``model_vars`` after the meta-step of φ, given the flat
        gradient g = ∇L(θ) (``[n]``).

        ``active`` (one bool per model variable, or None: all) restricts the step to the variables
        in this update, as ``lodo.algorithm.update``'s mask does; the others are not written."""
        grad = tf.cast(grad, self.dtype)
        alpha = tf.cast(alpha, self.dtype)
        state_vars = state.flatten()
        count = state.count[0].read_value() if self.adam else tf.zeros([], tf.int64)
        mask = None
        if active is not None and all(active):
            active = None
        if active is not None:
            active = tuple(bool(a) for a in active)
            mask = tf.constant(np.concatenate([np.full(int(np.prod(v.shape)), a) for v, a in zip(model_vars, active)]))
        cotangent = None  # the top segment starts it
        for program in reversed(self._programs):
            cotangent = program(state_vars, list(model_vars), grad, alpha, count, cotangent, mask, active)
        if self.adam:
            state.count[0].assign_add(1)

    def compiled(self, state: LayerState, model_vars) -> dict:
        """Each program of a step as XLA compiles it: ``{"segment 0-1": HloProto, …}`` (optimized HLO
        and its buffer assignment), for memory accounting and tests."""
        from tensorflow.compiler.xla.service import hlo_pb2

        plain = lambda v: v if isinstance(v, tf.Variable) else v.value  # Keras variables hold a tf.Variable
        state_vars, model_vars = [plain(v) for v in state.flatten()], [plain(v) for v in model_vars]
        grad = tf.zeros([self.network.n], self.dtype)
        alpha, count = tf.zeros([], self.dtype), tf.zeros([], tf.int64)
        pair = tf.zeros([self.network.padded], tf.complex(tf.zeros([], self.dtype), 0.0).dtype)
        out = {}
        for index, (lo, hi) in enumerate(self.segments):
            args = (state_vars, model_vars, grad, alpha, count, pair if index < len(self.segments) - 1 else None,
                    None, None)  # every variable in the update (no mask)
            serialized = self._programs[index].experimental_get_compiler_ir(*args)(
                stage="optimized_hlo_proto_serialized")
            out[f"segment {lo}-{hi - 1}"] = hlo_pb2.HloProto.FromString(serialized)
        return out

    def compiled_memory(self, state: LayerState, model_vars) -> dict:
        """Bytes that XLA allocates for each program of a step beyond its arguments (scratch, and
        the cotangent it returns), from its buffer assignment: ``{"segment 0-1": …, …}``. An updated
        variable that was not aliased to its input buffer would show up here as a whole copy."""
        return {name: scratch_bytes(proto) for name, proto in self.compiled(state, model_vars).items()}


def scratch_bytes(proto) -> int:
    """Bytes of the allocations in an ``HloProto``'s buffer assignment that are not arguments."""
    return int(sum(a.size for a in proto.buffer_assignment.buffer_allocations
                   if not (a.is_entry_computation_parameter or a.is_constant or a.is_thread_local)))
