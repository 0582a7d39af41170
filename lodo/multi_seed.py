"""LODO and its ablations for the multi-seed engine: ``lodo.algorithm`` with its state kept in variables.

Each class's constructor keywords are the hyperparameters of its YAML in
``configs/optimizer/``; the ablations (SPEC §1.3) override the preconditioner
hook or pin one hyperparameter, the same way as the Keras front end.

``initial_lr``, ``meta_lr`` and ``beta`` may each be a list with one value per
seed (see ``lodo.algorithm.update``): seed i then runs exactly as a scalar run
with the i-th values.
"""

from __future__ import annotations

from lodo import ablations, algorithm, meta_optimizers
from lodo.functional import FunctionalOptimizer, is_per_seed, seed_values


def _per_seed_or_float(value):
    return tuple(float(v) for v in value) if is_per_seed(value) else float(value)


def _validate(initial_lr, meta_lr, beta):
    """Every value (or per-seed entry) as ``LODOHyperparams`` checks a scalar one."""
    for name, value in (("initial_lr", initial_lr), ("meta_lr", meta_lr), ("beta", beta)):
        for v in (value if is_per_seed(value) else [value]):
            algorithm.LODOHyperparams(**{name: v})


class MultiSeedLODO(FunctionalOptimizer):
    """S independent LODOs, one per seed, each with its own permutations and blocks."""

    name = "lodo"

    def __init__(self, initial_lr=0.270, meta_lr=0.00096, beta=0.195, num_layers=16, block_size=4,
                 meta_optimizer="adam"):
        _validate(initial_lr, meta_lr, beta)
        self.alpha, self.beta = _per_seed_or_float(initial_lr), _per_seed_or_float(beta)
        self.num_layers, self.block_size = num_layers, block_size
        self.preconditioner = self._make_preconditioner()  # validates the shape now, not inside a compiled loop
        self.meta_optimizer = meta_optimizers.make(meta_optimizer, _per_seed_or_float(meta_lr))

        def init(n, seeds, dtype):
            for name, value in (("initial_lr", initial_lr), ("meta_lr", meta_lr), ("beta", beta)):
                seed_values(value, len(seeds), name)  # a per-seed list must have one value per seed
            return algorithm.init(n, seeds, self.preconditioner, self.meta_optimizer, dtype)

        def update(state, grad, params, oracle):
            return algorithm.update(state, grad, alpha=self.alpha, beta=self.beta,
                                    preconditioner=self.preconditioner, meta_optimizer=self.meta_optimizer)

        super().__init__(self.name, init, update)

    def _make_preconditioner(self):
        """G(φ); the ablations override this."""
        preconditioner = algorithm.BlockPermutationPreconditioner(self.num_layers, self.block_size)
        preconditioner.network(1)
        return preconditioner

    def preconditioner_times(self, matrix):
        state = self.state()
        alpha = meta_optimizers.scalar(self.alpha, matrix.dtype) if is_per_seed(self.alpha) else self.alpha
        return algorithm.precondition(self.preconditioner, state.weights, state.constants, alpha, matrix)


class MultiSeedLODODiagonal(MultiSeedLODO):
    name = "lodo_diagonal"

    def __init__(self, initial_lr=ablations.DIAGONAL_DEFAULTS.initial_lr, meta_lr=ablations.DIAGONAL_DEFAULTS.meta_lr,
                 beta=ablations.DIAGONAL_DEFAULTS.beta, meta_optimizer="adam"):
        super().__init__(initial_lr, meta_lr, beta, meta_optimizer=meta_optimizer)

    def _make_preconditioner(self):
        return ablations.DiagonalPreconditioner()


class MultiSeedLODOGlobal(MultiSeedLODO):
    name = "lodo_global"

    def __init__(self, initial_lr=ablations.GLOBAL_DEFAULTS.initial_lr, meta_lr=ablations.GLOBAL_DEFAULTS.meta_lr,
                 beta=ablations.GLOBAL_DEFAULTS.beta, meta_optimizer="adam"):
        super().__init__(initial_lr, meta_lr, beta, meta_optimizer=meta_optimizer)

    def _make_preconditioner(self):
        return ablations.GlobalPreconditioner()


class MultiSeedLODOResiduals(MultiSeedLODO):
    name = "lodo_residuals"

    def __init__(self, initial_lr=ablations.RESIDUALS_DEFAULTS.initial_lr,
                 meta_lr=ablations.RESIDUALS_DEFAULTS.meta_lr, beta=ablations.RESIDUALS_DEFAULTS.beta,
                 num_layers=64, meta_optimizer="adam"):
        super().__init__(initial_lr, meta_lr, beta, num_layers=num_layers, meta_optimizer=meta_optimizer)

    def _make_preconditioner(self):
        return ablations.ResidualPreconditioner(self.num_layers)


class MultiSeedLODONoMomentum(MultiSeedLODO):
    name = "lodo_no_momentum"

    def __init__(self, initial_lr=ablations.NO_MOMENTUM_DEFAULTS.initial_lr,
                 meta_lr=ablations.NO_MOMENTUM_DEFAULTS.meta_lr, num_layers=16, block_size=4, meta_optimizer="adam"):
        super().__init__(initial_lr, meta_lr, 0.0, num_layers, block_size, meta_optimizer)


class MultiSeedLODOSGD(MultiSeedLODO):
    name = "lodo_sgd"

    def __init__(self, initial_lr=ablations.SGD_DEFAULTS.initial_lr, meta_lr=ablations.SGD_DEFAULTS.meta_lr,
                 beta=ablations.SGD_DEFAULTS.beta, num_layers=16, block_size=4):
        super().__init__(initial_lr, meta_lr, beta, num_layers, block_size, "sgd")
