"""LODO and its ablations as Keras 3 optimizers: ``model.compile(optimizer=LODO(...))``.

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

One class per row of ``lodo.variants.VARIANTS``: ``LODO`` holds the machinery and
the ablations are generated subclasses that differ only in their row (preconditioner,
defaults, pinned hyperparameters). Each is registered with Keras under its own name, and
its constructor keywords, defaults and docstring come from its row, so a saved model
names its optimizer's class and ``keras.optimizers.deserialize`` rebuilds it.

They behave as Keras's own optimizers do (tests/test_keras_conformance.py runs Keras's generic
optimizer checks on them): ``initial_lr`` may be a ``LearningRateSchedule`` or a callable, an
unnamed instance is auto-named (``lodo``, ``lodo_1``, …), and a variable that is not in a step's
update (a ``None`` gradient, a layer frozen after compiling, ``overwrite_with_gradient``) is left
exactly as it is: the joint step is restricted to the variables in the update (the ``mask`` of
``lodo.algorithm.update``), since G would otherwise mix the others' momentum into the step and
move them too.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import keras
import numpy as np
import tensorflow as tf
from keras.src import backend
from keras.src.utils.naming import auto_name

from lodo import algorithm, layerwise, meta_optimizers, preconditioners, variants

PLANS = ("auto", "fast", "lean")
KERAS_ARGUMENT_DOCS = {
    "seed": "draws the preconditioner's permutations and initial weights.",
    "name": "the optimizer's name; None: Keras's automatic one (the variant's name, then ``_1``, ``_2``, …).",
    "plan": ("memory layout of the block-permutation core (``lodo.layerwise.Plan.choose``): ``\"auto\"`` (fast "
             "while that costs little memory, else lean), ``\"fast\"``, ``\"lean\"`` or a ``layerwise.Plan``. It "
             "never changes the numbers, so it is not part of the config; other preconditioners ignore it."),
}


def _keywords(variant: variants.Variant) -> dict:
    """``initial_lr, meta_lr, beta, <preconditioner fields>, seed, meta_optimizer, name, plan`` and their
    defaults, without the pinned ones: the keywords of the classes as they were written by hand."""
    keywords = dict(variant.hyperparameters())
    meta = {k: keywords.pop(k) for k in ["meta_optimizer"] if k in keywords}
    return {**keywords, "seed": 0, **meta, "name": None, "plan": "auto"}


def _describe(cls, variant: variants.Variant):
    """Gives ``cls`` its row (``cls.variant``), the constructor signature that ``__init__`` binds its
    arguments to (and that ``inspect.signature`` reports), and its docstring."""
    keywords = _keywords(variant)
    cls.variant = variant
    cls.__signature__ = variants.signature(keywords, var_keyword="kwargs")
    docs = dict(KERAS_ARGUMENT_DOCS)
    docs["initial_lr"] = (variants.ARGUMENT_DOCS["initial_lr"] + " A float, or a "
                          "``keras.optimizers.schedules.LearningRateSchedule`` or callable, as Keras's learning_rate.")
    cls.__doc__ = variant.docstring(f"{variant.label}: {variant.summary}", keywords, docs,
                                    "\n    **kwargs: passed to ``keras.optimizers.Optimizer`` (e.g. ``clipnorm``).")
    return cls


def _is_schedule(value) -> bool:
    """Whether a learning rate is one Keras evaluates every step (a schedule or a callable), not a number."""
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule) or callable(value)


def _tf_variable(v):
    """The ``tf.Variable`` under a Keras variable (plain ``tf.Variable``s pass through)."""
    return v.value if isinstance(v, backend.Variable) else v


@keras.saving.register_keras_serializable(package="lodo")
class LODO(keras.optimizers.Optimizer):
    # ``variant`` (the class's row of the table), the docstring and the constructor's signature
    # are set by ``_describe`` below.

    def __init__(self, *args, **kwargs):
        bound = type(self).__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        extra = given.pop("kwargs")
        if "learning_rate" in extra:
            raise ValueError(f"{self.variant.label} takes its learning rate as initial_lr (α0, the scale of G), "
                             f"not learning_rate; pass initial_lr={extra['learning_rate']!r}")
        given.update({k: extra.pop(k) for k in list(extra) if k in self.variant.pinned})
        settings = self.variant.settings(given)
        initial_lr, meta_lr, beta = settings["initial_lr"], settings["meta_lr"], settings["beta"]
        scheduled = _is_schedule(initial_lr)
        # validates; a schedule's values are its own business, as they are for Keras's learning_rate
        algorithm.LODOHyperparams(initial_lr=self.variant.defaults.initial_lr if scheduled else initial_lr,
                                  meta_lr=meta_lr, beta=beta)
        name = settings["name"] if settings["name"] is not None else auto_name(self.variant.name)
        super().__init__(learning_rate=initial_lr if scheduled else float(initial_lr), name=name, **extra)
        self.meta_lr = float(meta_lr)
        self.beta = float(beta)
        for key in self.variant.preconditioner_fields:  # num_layers, block_size, …
            setattr(self, key, settings[key])
        self.seed = int(settings["seed"])
        self.meta_optimizer_name = settings["meta_optimizer"]
        self._preconditioner = self.variant.make_preconditioner(settings)  # validates its fields now, not at build
        self._meta = meta_optimizers.make(self.meta_optimizer_name, self.meta_lr)
        plan = settings["plan"]
        self._plan_request = plan
        if not isinstance(plan, layerwise.Plan) and plan not in PLANS:
            raise ValueError(f"LODO plan must be 'auto', 'fast', 'lean' or a layerwise.Plan, got {plan!r}")

    @property
    def preconditioner(self):
        """G(φ)'s preconditioner object (``lodo.preconditioners``); its fields are in ``get_config``."""
        return self._preconditioner

    @property
    def layerwise(self) -> bool:
        """Whether this optimizer runs on the ``lodo.layerwise`` core (block-permutation G, Adam or SGD on φ)."""
        return type(self._preconditioner) is preconditioners.BlockPermutation and isinstance(
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
            rng = np.random.default_rng([self.seed, preconditioners.RNG_STREAM])  # algorithm.init's stream
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
        # Keras leaves out the variables without a gradient (None, frozen, overwrite_with_gradient);
        # LODO's vector has every slot: theirs are zeros and the step is restricted to the others.
        by_index = {self._get_variable_index(v): g for (g, _), v in zip(pairs, trainable_variables)}
        full = [
            by_index.get(i, tf.zeros(v.shape, v.dtype)) for i, v in enumerate(self._trainable_variables)
        ]
        active = tuple(i in by_index for i in range(len(self._trainable_variables)))
        all_variables = [_tf_variable(v) for v in self._trainable_variables]
        # ``active`` is the same Python value on every replica: bound, it is not passed through merge_call.
        joint_update = functools.partial(self._distributed_joint_update, active=None if all(active) else active)
        tf.__internal__.distribute.interim.maybe_merge_call(
            joint_update, self._distribution_strategy, full, all_variables, learning_rate
        )

    def _distributed_joint_update(self, distribution, grads, variables, learning_rate, active):
        # Anchored on one state variable, ``update`` runs the function once per
        # device with that device's copies of every argument.
        anchor = self._state_variables[0].value
        state_vars = [v.value for v in self._state_variables]
        distribution.extended.update(
            anchor, functools.partial(self._joint_update, active=active),
            args=(grads, variables, state_vars, learning_rate), group=False
        )

    def _joint_update(self, _anchor, grads, variables, state_vars, learning_rate, active):
        """One step; ``active`` (a bool per variable, or None: all) names the variables in this update."""
        dtype = self._state_dtype
        flat_grad = tf.concat([tf.reshape(tf.cast(g, dtype), [-1]) for g in grads], axis=0)
        if self.layerwise:
            self._core.step(self._layer_state.unflatten(state_vars), flat_grad, variables, learning_rate, active)
            return
        mask = None if active is None else np.concatenate([np.full(k, a) for k, a in zip(self._sizes, active)])
        state = tf.nest.pack_sequence_as(self._treedef, [v.read_value() for v in state_vars])
        step, state = algorithm.update(
            state,
            flat_grad[None],
            alpha=learning_rate,
            beta=self.beta,
            preconditioner=self._preconditioner,
            meta_optimizer=self._meta,
            mask=None if mask is None else mask[None],
        )
        for var, value in zip(state_vars, tf.nest.flatten(state)):
            var.assign(value)
        for i, (var, piece) in enumerate(zip(variables, tf.split(step[0], self._sizes))):
            if active is None or active[i]:
                var.assign_sub(tf.cast(tf.reshape(piece, var.shape), var.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            initial_lr=config.pop("learning_rate"),  # Keras's form: a float, or a serialized schedule or callable
            meta_lr=self.meta_lr,
            beta=self.beta,
            seed=self.seed,
            meta_optimizer=self.meta_optimizer_name,
            **dataclasses.asdict(self._preconditioner),
        )
        for key in self.variant.pinned:
            config.pop(key)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("initial_lr"), dict):  # a serialized schedule or callable
            config["initial_lr"] = keras.saving.deserialize_keras_object(config["initial_lr"],
                                                                         custom_objects=custom_objects)
        return cls(**config)


def _keras_class(variant: variants.Variant) -> type:
    """A registered subclass of ``LODO`` for an ablation's row."""
    namespace = {"__module__": __name__, "__qualname__": variant.class_name}
    cls = types.new_class(variant.class_name, (LODO,), exec_body=lambda ns: ns.update(namespace))
    return keras.saving.register_keras_serializable(package="lodo")(_describe(cls, variant))


_describe(LODO, variants.LODO)
for _variant in variants.VARIANTS:
    if _variant is not variants.LODO:
        globals()[_variant.class_name] = _keras_class(_variant)
__all__ = [v.class_name for v in variants.VARIANTS]
