"""Adam, Momentum (heavy ball) and RMSprop: Keras's own classes on the engine's ``[S, n]`` variable.

Their rules are element-wise, so one Keras optimizer on the stacked variable
treats every seed independently and exactly.
"""

from __future__ import annotations

import keras

from optimizers.base import KerasOptimizer


def adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    return KerasOptimizer("adam", keras.optimizers.Adam(learning_rate, beta_1, beta_2, epsilon))


def momentum(learning_rate=0.01, momentum=0.9):
    return KerasOptimizer("momentum", keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=False))


def momentum_ema(learning_rate=0.01, momentum=0.9):
    """Momentum as an average of gradients: m ← μm + (1 − μ)g, θ ← θ − lr·m.

    Exactly heavy ball with learning rate lr·(1 − μ) (substitute v = −lr·m),
    so it is Keras's SGD with that rate. The paper's Rosenbrock value for
    Momentum (Table 8) is reproduced by this form with its tuned
    hyperparameters, not by heavy ball with the same numbers.
    """
    return KerasOptimizer("momentum_ema", keras.optimizers.SGD(learning_rate * (1 - momentum), momentum=momentum,
                                                              nesterov=False))


def rmsprop(learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7):
    return KerasOptimizer("rmsprop", keras.optimizers.RMSprop(learning_rate, rho=rho, momentum=momentum, epsilon=epsilon))
