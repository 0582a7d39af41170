"""NumPy replays that several test files compare the engine against."""

import numpy as np
import tensorflow as tf


def numpy_bowl(bowl, seed, steps, step):
    """One seed's noisy bowl in plain NumPy; returns every iterate ``[steps, n]``.

    ``step(theta, grad_fn, t)`` returns the next theta; ``grad_fn(x)`` is the
    gradient on step t's minibatch (the center after its t-th move), so an
    optimizer may evaluate it at more than one point.
    """
    problem = bowl.setup([seed])
    hess = problem.constants["hessian"].numpy()[0]
    theta, center, iterates = np.zeros(bowl.num_params), problem.initial_batch_state, []
    for t in range(steps):
        center = bowl.next_batch(problem, center, tf.constant(t, tf.int64))
        c = center.numpy()[0]
        theta = step(theta, lambda x, c=c: hess @ (x - c), t)
        iterates.append(theta)
    return np.array(iterates)
