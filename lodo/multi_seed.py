"""LODO for the multi-seed engine: ``lodo.algorithm`` with its state kept in variables."""

from __future__ import annotations

from lodo import algorithm, meta_optimizers
from optimizers.base import FunctionalOptimizer


class MultiSeedLODO(FunctionalOptimizer):
    """S independent LODOs, one per seed, each with its own permutations and blocks."""

    def __init__(self, initial_lr=0.270, meta_lr=0.00096, beta=0.195, num_layers=16, block_size=4,
                 meta_optimizer="adam"):
        algorithm.LODOHyperparams(initial_lr=initial_lr, meta_lr=meta_lr, beta=beta)  # validates
        self.alpha, self.beta = float(initial_lr), float(beta)
        self.preconditioner = algorithm.BlockPermutationPreconditioner(num_layers, block_size)
        self.preconditioner.network(1)  # validates the shape now, not inside a compiled loop
        self.meta_optimizer = meta_optimizers.make(meta_optimizer, float(meta_lr))

        def init(n, seeds, dtype):
            return algorithm.init(n, seeds, self.preconditioner, self.meta_optimizer, dtype)

        def update(state, grad, params, oracle):
            return algorithm.update(state, grad, alpha=self.alpha, beta=self.beta,
                                    preconditioner=self.preconditioner, meta_optimizer=self.meta_optimizer)

        super().__init__("lodo", init, update)

    def preconditioner_times(self, matrix):
        state = self.state()
        alpha = self.alpha
        return self.preconditioner.apply(state.weights, state.constants, alpha, matrix)
