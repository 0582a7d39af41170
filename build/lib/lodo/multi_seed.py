"""LODO and its ablations for the multi-seed engine: ``lodo.algorithm`` with its state kept in variables.

One class per row of ``lodo.variants.VARIANTS``, named ``"MultiSeed" + class_name``:
``MultiSeedLODO`` holds the machinery and the ablations are generated subclasses. A
class's constructor keywords are its row's hyperparameters, the keys of its YAML in
``configs/optimizer/``, the same as the Keras front end's.

``initial_lr``, ``meta_lr`` and ``beta`` may each be a list with one value per
seed (see ``lodo.algorithm.update``): seed i then runs exactly as a scalar run
with the i-th values.
"""

from __future__ import annotations

import types

from lodo import algorithm, meta_optimizers, variants
from lodo.functional import FunctionalOptimizer, is_per_seed, seed_values


def _per_seed_or_float(value):
    return tuple(float(v) for v in value) if is_per_seed(value) else float(value)


def _validate(initial_lr, meta_lr, beta):
    """Every value (or per-seed entry) as ``LODOHyperparams`` checks a scalar one."""
    for name, value in (("initial_lr", initial_lr), ("meta_lr", meta_lr), ("beta", beta)):
        for v in (value if is_per_seed(value) else [value]):
            algorithm.LODOHyperparams(**{name: v})


def _describe(cls, variant: variants.Variant):
    """Gives ``cls`` its row (``cls.variant``, ``cls.name``), the constructor signature that ``__init__``
    binds its arguments to (and that ``optimizers.build`` checks a config against), and its docstring."""
    keywords = variant.hyperparameters()
    cls.variant, cls.name = variant, variant.name
    cls.__signature__ = variants.signature(keywords)
    cls.__doc__ = variant.docstring(f"S independent copies of {variant.label}, one per seed, each with its own "
                                    f"random draws. {variant.summary} initial_lr, meta_lr and beta may also be "
                                    f"lists, one value per seed.", keywords)
    return cls


class MultiSeedLODO(FunctionalOptimizer):
    # ``variant``, ``name``, the docstring and the constructor's signature are set by ``_describe`` below.

    def __init__(self, *args, **kwargs):
        bound = type(self).__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        settings = self.variant.settings(bound.arguments)
        initial_lr, meta_lr, beta = settings["initial_lr"], settings["meta_lr"], settings["beta"]
        _validate(initial_lr, meta_lr, beta)
        self.alpha, self.beta = _per_seed_or_float(initial_lr), _per_seed_or_float(beta)
        for key in self.variant.preconditioner_fields:  # num_layers, block_size, …
            setattr(self, key, settings[key])
        # validates the preconditioner's fields now, not inside a compiled loop
        self.preconditioner = self.variant.make_preconditioner(settings)
        self.meta_optimizer = meta_optimizers.make(settings["meta_optimizer"], _per_seed_or_float(meta_lr))

        def init(n, seeds, dtype):
            for name, value in (("initial_lr", initial_lr), ("meta_lr", meta_lr), ("beta", beta)):
                seed_values(value, len(seeds), name)  # a per-seed list must have one value per seed
            return algorithm.init(n, seeds, self.preconditioner, self.meta_optimizer, dtype)

        def update(state, grad, params, oracle):
            return algorithm.update(state, grad, alpha=self.alpha, beta=self.beta,
                                    preconditioner=self.preconditioner, meta_optimizer=self.meta_optimizer)

        super().__init__(self.name, init, update)

    def preconditioner_times(self, matrix):
        state = self.state()
        alpha = meta_optimizers.scalar(self.alpha, matrix.dtype) if is_per_seed(self.alpha) else self.alpha
        return algorithm.precondition(self.preconditioner, state.weights, state.constants, alpha, matrix)


def _engine_class(variant: variants.Variant) -> type:
    """A subclass of ``MultiSeedLODO`` for an ablation's row."""
    name = "MultiSeed" + variant.class_name
    cls = types.new_class(name, (MultiSeedLODO,),
                          exec_body=lambda ns: ns.update({"__module__": __name__, "__qualname__": name}))
    return _describe(cls, variant)


_describe(MultiSeedLODO, variants.LODO)
for _variant in variants.VARIANTS:
    if _variant is not variants.LODO:
        globals()["MultiSeed" + _variant.class_name] = _engine_class(_variant)
__all__ = ["MultiSeed" + v.class_name for v in variants.VARIANTS]
