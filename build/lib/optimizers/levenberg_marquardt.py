"""Levenberg–Marquardt (Levenberg 1944) with the exact Hessian: θ ← θ − (H² + λ·diag(H²))⁻¹ H g.

It is Gauss–Newton on ‖g‖² with Marquardt's scale-invariant damping: H² plays
JᵀJ and H g plays Jᵀr. λ → 0 gives Newton's step H⁻¹g; λ > 0 shortens the
steps along directions whose squared curvature is small next to diag(H²).
Stateless, so it has no preconditioner to report.
"""

from __future__ import annotations

import tensorflow as tf

from lodo.functional import FunctionalOptimizer


def init(n, seeds, dtype):
    return ()


def update(state, grad, params, oracle, *, lam: float):
    """The step to subtract from θ (and the empty state)."""
    h = oracle.hessian(params)
    h2 = tf.matmul(h, h)
    damped = h2 + lam * tf.linalg.diag(tf.linalg.diag_part(h2))
    return tf.linalg.solve(damped, tf.linalg.matvec(h, grad)[..., None])[..., 0], state


class LevenbergMarquardt(FunctionalOptimizer):
    name = "levenberg_marquardt"

    def __init__(self, lam=1e-3):
        if not lam >= 0:
            raise ValueError(f"optimizer.lam must be >= 0, got {lam}")
        self.lam = float(lam)
        super().__init__(self.name, init, lambda state, grad, params, oracle: update(
            state, grad, params, oracle, lam=self.lam))
