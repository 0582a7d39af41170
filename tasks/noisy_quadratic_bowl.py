"""The noisy quadratic bowl (SPEC §3.1): a 100-D quadratic whose center random-walks."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tasks.base import Problem, SmallTask, noise_key, problem_rng


def eigenvalues(dim: int, eig_min: float, eig_max: float) -> np.ndarray:
    return np.geomspace(eig_min, eig_max, dim)


@tf.function(jit_compile=True)
def _standard_normal(keys, step, dim, dtype):
    """ξ ~ N(0, I) per seed, from stateless Philox keyed by (seed, step).

    One draw per seed keeps a seed's noise independent of the seeds beside it.
    Always compiled with XLA: XLA's stateless kernels give other numbers than
    TensorFlow's, and the engine runs under XLA, so every caller must too.
    """
    return tf.stack([
        tf.random.stateless_normal([dim], seed=tf.stack([keys[i], step]), dtype=dtype, alg="philox")
        for i in range(keys.shape[0])
    ])


class NoisyQuadraticBowl(SmallTask):
    """L(θ) = ½(θ − c)ᵀH(θ − c), H = U diag(λ) Uᵀ, with c ← c + ξ, ξ ~ N(0, σ²I), per batch."""

    name = "noisy_quadratic_bowl"
    optimum_label = "analytic optimum ½·tr(H)·σ² (Newton)"

    def __init__(self, dim=100, noise_variance=1.0, eig_min=0.001, eig_max=1.0, steps=100_000, problem_offset=0):
        if dim < 1:
            raise ValueError(f"task.dim must be a positive integer, got {dim}")
        if not noise_variance >= 0:
            raise ValueError(f"task.noise_variance must be >= 0, got {noise_variance}")
        if not 0 < eig_min <= eig_max:
            raise ValueError(f"task eigenvalues need 0 < eig_min <= eig_max, got {eig_min}, {eig_max}")
        self.num_params = int(dim)
        self.noise_variance = float(noise_variance)
        self.eigenvalues = eigenvalues(dim, eig_min, eig_max)
        self.steps = int(steps)
        if isinstance(problem_offset, bool) or not isinstance(problem_offset, int) or problem_offset < 0:
            raise ValueError(f"task.problem_offset must be a non-negative integer, got {problem_offset!r}")
        # Offset k > 0 gives each seed its k-th other bowl (new eigenvectors, new noise), e.g. the
        # frozen-preconditioner test's new bowl; 0 keeps the seed's original streams unchanged.
        self.problem_offset = problem_offset

    def hessian_matrix(self, seed: int) -> np.ndarray:
        q, r = np.linalg.qr(problem_rng(seed, self.problem_offset).standard_normal((self.num_params, self.num_params)))
        q = q * np.sign(np.diag(r))
        return (q * self.eigenvalues) @ q.T

    def setup(self, seeds):
        hess = np.stack([self.hessian_matrix(s) for s in seeds])
        zeros = tf.zeros([len(seeds), self.num_params], self.dtype)
        keys = tf.constant([noise_key(s) for s in seeds], tf.int64)
        return Problem(tuple(seeds), {"hessian": tf.constant(hess, self.dtype), "noise_keys": keys}, zeros, zeros)

    def next_batch(self, problem, center, step):
        scale = tf.cast(np.sqrt(self.noise_variance), self.dtype)
        # The offset lives in the counter's high bits: no run gets near 2**40 steps.
        counter = tf.cast(step, tf.int64) + self.problem_offset * 2**40
        return center + scale * _standard_normal(problem.constants["noise_keys"], counter, self.num_params, self.dtype)

    def loss(self, problem, params, center):
        d = params - center
        return 0.5 * tf.reduce_sum(d * tf.linalg.matvec(problem.constants["hessian"], d), axis=-1)

    def loss_and_grad(self, problem, params, center):
        d = params - center
        hd = tf.linalg.matvec(problem.constants["hessian"], d)
        return 0.5 * tf.reduce_sum(d * hd, axis=-1), hd

    def hessian(self, problem, params, batch):
        return problem.constants["hessian"]

    def never_moving_loss(self, first_losses, start: int, stop: int) -> float:
        """E[mean loss over steps [start, stop)] at θ0 = c0 = 0: the loss of step t sees c after t + 1 draws."""
        return 0.5 * float(self.eigenvalues.sum()) * self.noise_variance * (start + stop + 1) / 2

    def optimum_loss(self):
        """Newton jumps to the current center; the next move costs ½ E[ξᵀHξ] = ½ tr(H) σ²."""
        return 0.5 * float(self.eigenvalues.sum()) * self.noise_variance
