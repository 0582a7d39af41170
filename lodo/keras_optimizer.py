"""LODO as a Keras 3 optimizer: ``model.compile(optimizer=LODO(...))``.

LODO preconditions the flattened vector of *all* trainable variables jointly,
so it cannot use Keras's per-variable ``update_step``. It overrides
``_backend_update_step`` instead, and therefore must all-reduce gradients
across replicas itself (TensorFlow's default implementation of that method,
which it replaces, is where Keras does so) and run the joint update once on
every device through ``distribution.extended.update``. The arithmetic is
``lodo.algorithm.update`` with one seed: for the block-permutation
preconditioner it runs as ``lodo.layerwise``'s compiled, in-place, layer-by-layer
core (same numbers, a fraction of the memory and time on image-scale models);
the other preconditioners call ``lodo.algorithm.update`` itself.

The ablations of SPEC §1.3 are small subclasses: they swap the preconditioner
through ``_make_preconditioner`` or pin one hyperparameter.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras.src import backend

from lodo import ablations, algorithm, layerwise, meta_optimizers


def _tf_variable(v):
    """The ``tf.Variable`` under a Keras variable (plain ``tf.Variable``s pass through)."""
    return v.value if isinstance(v, backend.Variable) else v


@keras.saving.register_keras_serializable(package="lodo")
class LODO(keras.optimizers.Optimizer):
    """Learning to Optimize During Optimization (Liao et al., TMLR 2023).

    Args:
        initial_lr: α0, the scale of G(φ); LODO starts as momentum SGD with
            this learning rate. It is the optimizer's ``learning_rate``, so a
            Keras schedule scales G over time.
        meta_lr: learning rate of the meta-optimizer that trains φ.
        beta: momentum of the gradient EMA fed to G.
        num_layers, block_size: N and k of G̃ (Equation 2).
        seed: draws the permutations and initial orthogonal blocks.
        meta_optimizer: ``"adam"`` (the paper) or ``"sgd"`` (an ablation).
        plan: memory layout of the block-permutation core (``lodo.layerwise.Plan.choose``):
            ``"auto"`` (fast while that costs little memory, else lean), ``"fast"``,
            ``"lean"`` or a ``layerwise.Plan``. It never changes the numbers, so it is
            not part of the config.
    """

    # get_config keys that a subclass pins, so its __init__ does not take them.
    _pinned_config_keys = ()

    def __init__(
        self,
        initial_lr=0.270,
        meta_lr=0.00096,
        beta=0.195,
        num_layers=16,
        block_size=4,
        seed=0,
        meta_optimizer="adam",
        name="lodo",
        plan="auto",
        **kwargs,
    ):
        kwargs.pop("learning_rate", None)
        super().__init__(learning_rate=initial_lr, name=name, **kwargs)
        algorithm.LODOHyperparams(initial_lr=initial_lr, meta_lr=meta_lr, beta=beta)  # validates
        self.meta_lr = float(meta_lr)
        self.beta = float(beta)
        self.num_layers = num_layers
        self.block_size = block_size
        self.seed = int(seed)
        self.meta_optimizer_name = meta_optimizer
        self._preconditioner = self._make_preconditioner()
        self._meta = meta_optimizers.make(meta_optimizer, self.meta_lr)
        self._plan_request = plan
        if not isinstance(plan, layerwise.Plan) and plan not in ("auto", "fast", "lean"):
            raise ValueError(f"LODO plan must be 'auto', 'fast', 'lean' or a layerwise.Plan, got {plan!r}")

    def _make_preconditioner(self):
        """G(φ); ablations override this. The dataclass's fields are serialized by ``get_config``."""
        preconditioner = algorithm.BlockPermutationPreconditioner(self.num_layers, self.block_size)
        preconditioner.network(1)  # validates num_layers and block_size now, not at build
        return preconditioner

    @property
    def layerwise(self) -> bool:
        """Whether this optimizer runs on the ``lodo.layerwise`` core (block-permutation G, Adam or SGD on φ)."""
        return type(self._preconditioner) is algorithm.BlockPermutationPreconditioner and isinstance(
            self._meta, (meta_optimizers.Adam, meta_optimizers.SGD))

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        dtypes = {v.dtype for v in variables}
        self._state_dtype = sorted(dtypes)[0] if len(dtypes) == 1 else keras.config.floatx()
        self._sizes = [int(np.prod(v.shape)) for v in variables]
        n = sum(self._sizes)
        if self.layerwise:
            network = self._preconditioner.network(n)
            self.plan = layerwise.Plan.choose(network, tf.as_dtype(self._state_dtype).size, self._plan_request)
            rng = np.random.default_rng([self.seed, algorithm.RNG_STREAM])  # algorithm.init's stream
            self._layer_state = layerwise.create_state(self.add_variable, network, self.plan, rng, self._state_dtype,
                                                  self._meta)
            self._state_variables = self._layer_state.flatten()
            self._core = layerwise.LayerwiseCore(network, self.plan, self._meta, self.beta, self._state_dtype,
                                                 self._layer_state)
            return
        initial = algorithm.init(n, [self.seed], self._preconditioner, self._meta, dtype=self._state_dtype)
        self._treedef = initial
        self._state_variables = [
            self.add_variable(
                shape=leaf.shape,
                initializer=lambda shape, dtype, value=leaf: tf.cast(value, dtype),
                dtype=leaf.dtype.name,
                name=f"lodo_state_{i}",
            )
            for i, leaf in enumerate(tf.nest.flatten(initial))
        ]

    @property
    def num_state_elements(self) -> int:
        """Entries of optimizer state (for memory reports)."""
        return int(sum(np.prod(v.shape) for v in self._state_variables))

    @property
    def state_bytes(self) -> int:
        """Bytes of LODO's own state variables (φ, meta-optimizer moments, permutations, momentum)."""
        return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in self._state_variables))

    def state(self) -> algorithm.LODOState:
        """The current state as a ``LODOState`` (for diagnostics and tests)."""
        if not self.layerwise:
            return tf.nest.pack_sequence_as(self._treedef, [v.value for v in self._state_variables])
        layers = self._layer_state
        value = lambda v: tf.convert_to_tensor(v.value)
        seed_axis = lambda vs: tuple(value(v)[None] for v in vs)
        inverses = tf.stack([value(q) for q in layers.inverses])[None]
        perms = tf.stack([tf.math.invert_permutation(q) for q in tf.unstack(inverses[0])])[None]
        meta = (value(layers.count[0]), seed_axis(layers.first), seed_axis(layers.second)) if layers.count else ()
        return algorithm.LODOState(seed_axis(layers.blocks), (perms, inverses), value(layers.momentum[0])[None], meta)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        pairs = self._all_reduce_sum_gradients(list(zip(grads, map(_tf_variable, trainable_variables))))
        # Keras drops variables whose gradient is None; LODO needs every slot.
        by_index = {self._get_variable_index(v): g for (g, _), v in zip(pairs, trainable_variables)}
        full = [
            by_index.get(i, tf.zeros(v.shape, v.dtype)) for i, v in enumerate(self._trainable_variables)
        ]
        all_variables = [_tf_variable(v) for v in self._trainable_variables]
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_joint_update, self._distribution_strategy, full, all_variables, learning_rate
        )

    def _distributed_joint_update(self, distribution, grads, variables, learning_rate):
        # Anchored on one state variable, ``update`` runs the function once per
        # device with that device's copies of every argument.
        anchor = self._state_variables[0].value
        state_vars = [v.value for v in self._state_variables]
        distribution.extended.update(
            anchor, self._joint_update, args=(grads, variables, state_vars, learning_rate), group=False
        )

    def _joint_update(self, _anchor, grads, variables, state_vars, learning_rate):
        dtype = self._state_dtype
        flat_grad = tf.concat([tf.reshape(tf.cast(g, dtype), [-1]) for g in grads], axis=0)
        if self.layerwise:
            self._core.step(self._layer_state.unflatten(state_vars), flat_grad, variables, learning_rate)
            return
        state = tf.nest.pack_sequence_as(self._treedef, [v.read_value() for v in state_vars])
        step, state = algorithm.update(
            state,
            flat_grad[None],
            alpha=learning_rate,
            beta=self.beta,
            preconditioner=self._preconditioner,
            meta_optimizer=self._meta,
        )
        for var, value in zip(state_vars, tf.nest.flatten(state)):
            var.assign(value)
        for var, piece in zip(variables, tf.split(step[0], self._sizes)):
            var.assign_sub(tf.cast(tf.reshape(piece, var.shape), var.dtype))

    def get_config(self):
        config = super().get_config()
        config.pop("learning_rate", None)
        config.update(
            initial_lr=float(self._learning_rate.numpy()) if hasattr(self._learning_rate, "numpy") else self._learning_rate,
            meta_lr=self.meta_lr,
            beta=self.beta,
            seed=self.seed,
            meta_optimizer=self.meta_optimizer_name,
            **dataclasses.asdict(self._preconditioner),
        )
        for key in self._pinned_config_keys:
            config.pop(key)
        return config


@keras.saving.register_keras_serializable(package="lodo")
class LODODiagonal(LODO):
    """LODO-Diagonal: G = α0·diag(φ), φ initialized to ones."""

    def __init__(self, initial_lr=ablations.DIAGONAL_DEFAULTS.initial_lr, meta_lr=ablations.DIAGONAL_DEFAULTS.meta_lr,
                 beta=ablations.DIAGONAL_DEFAULTS.beta, seed=0, meta_optimizer="adam", name="lodo_diagonal", **kwargs):
        super().__init__(initial_lr, meta_lr, beta, seed=seed, meta_optimizer=meta_optimizer, name=name, **kwargs)

    def _make_preconditioner(self):
        return ablations.DiagonalPreconditioner()


@keras.saving.register_keras_serializable(package="lodo")
class LODOGlobal(LODO):
    """LODO-Global: G = α0·φ·I, one learned scalar φ initialized to 1."""

    def __init__(self, initial_lr=ablations.GLOBAL_DEFAULTS.initial_lr, meta_lr=ablations.GLOBAL_DEFAULTS.meta_lr,
                 beta=ablations.GLOBAL_DEFAULTS.beta, seed=0, meta_optimizer="adam", name="lodo_global", **kwargs):
        super().__init__(initial_lr, meta_lr, beta, seed=seed, meta_optimizer=meta_optimizer, name=name, **kwargs)

    def _make_preconditioner(self):
        return ablations.GlobalPreconditioner()


@keras.saving.register_keras_serializable(package="lodo")
class LODOResiduals(LODO):
    """LODO-Residuals: G = α0·RᵀDR, R a product of ``num_layers`` residual permutation layers."""

    def __init__(self, initial_lr=ablations.RESIDUALS_DEFAULTS.initial_lr,
                 meta_lr=ablations.RESIDUALS_DEFAULTS.meta_lr, beta=ablations.RESIDUALS_DEFAULTS.beta,
                 num_layers=64, seed=0, meta_optimizer="adam", name="lodo_residuals", **kwargs):
        super().__init__(initial_lr, meta_lr, beta, num_layers=num_layers, seed=seed,
                         meta_optimizer=meta_optimizer, name=name, **kwargs)

    def _make_preconditioner(self):
        return ablations.ResidualPreconditioner(self.num_layers)


@keras.saving.register_keras_serializable(package="lodo")
class LODONoMomentum(LODO):
    """LODO-No-Momentum: β = 0, so G is applied to the raw gradient."""

    _pinned_config_keys = ("beta",)

    def __init__(self, initial_lr=ablations.NO_MOMENTUM_DEFAULTS.initial_lr,
                 meta_lr=ablations.NO_MOMENTUM_DEFAULTS.meta_lr, num_layers=16, block_size=4, seed=0,
                 meta_optimizer="adam", name="lodo_no_momentum", **kwargs):
        super().__init__(initial_lr, meta_lr, 0.0, num_layers, block_size, seed, meta_optimizer, name, **kwargs)


@keras.saving.register_keras_serializable(package="lodo")
class LODOSGD(LODO):
    """LODO-SGD: φ is trained by plain gradient descent (learning rate ``meta_lr``) instead of Adam."""

    _pinned_config_keys = ("meta_optimizer",)

    def __init__(self, initial_lr=ablations.SGD_DEFAULTS.initial_lr, meta_lr=ablations.SGD_DEFAULTS.meta_lr,
                 beta=ablations.SGD_DEFAULTS.beta, num_layers=16, block_size=4, seed=0, name="lodo_sgd", **kwargs):
        super().__init__(initial_lr, meta_lr, beta, num_layers, block_size, seed, "sgd", name, **kwargs)
