"""Meta-trains the L2LBGDBGD LSTM on noisy quadratic bowls and saves its weights.

    python scripts/meta_train_l2l.py --out optimizers/weights/l2lbgdbgd_bowl.npz

Truncated back-propagation through unrolled optimization: a population of
``--batch`` bowls is optimized by the LSTM; each meta-iteration unrolls
``--unroll`` steps from where the previous truncation stopped, takes the mean
bowl loss over those steps as the meta-loss, back-propagates it to the LSTM
weights (through the gradients too: on a quadratic they are exact and cheap)
and takes one Adam step on them. Each bowl restarts (θ = c = 0, fresh LSTM
state, fresh eigenvectors) every ``--reset-every`` truncations, staggered
across the population so every batch mixes fresh and long-running bowls: the
evaluation runs 100k steps, so the LSTM must learn the steady state where the
slow modes' error has built up, not just the first few steps.

Defaults (50-step truncations, restarts every 2000 steps, 1500 iterations of
16 bowls) were chosen on 8 held-out bowls x 20k steps: 20-step truncations
reached 15.0 (1500 iterations) and 14.4 (3000), 50-step ones 13.6 (1200) and
13.5 (2400), 100-step ones 13.75 (600). Short truncations bias the meta-gradient
towards greedy, too-small steps (the short-horizon bias of Wu et al. 2018):
the slow modes pay off a step only hundreds of steps later.

Bowls follow SPEC §3.1 (n = 100, eigenvalues geometric in [0.001, 1], center
random walk with σ² = 1) but draw eigenvectors and noise from their own random
stream, never the evaluation seeds'. Runs in float32; seeded and deterministic.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent

import numpy as np
import tensorflow as tf

from optimizers import l2lbgdbgd

META_STREAM = 0x4C324C  # distinct from tasks.base's PROBLEM_STREAM and NOISE_STREAM


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=l2lbgdbgd.DEFAULT_WEIGHTS, help="weight file (.npz)")
    parser.add_argument("--iterations", type=int, default=1500, help="meta-iterations (Adam steps)")
    parser.add_argument("--batch", type=int, default=16, help="bowls per meta-iteration")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--eig-min", type=float, default=0.001)
    parser.add_argument("--eig-max", type=float, default=1.0)
    parser.add_argument("--noise-variance", type=float, default=1.0)
    parser.add_argument("--unroll", type=int, default=50, help="steps per truncation")
    parser.add_argument("--reset-every", type=int, default=40, help="truncations before a bowl restarts")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine-decayed to 10%%)")
    parser.add_argument("--clip", type=float, default=1.0, help="global norm clip of the meta-gradient")
    parser.add_argument("--preprocessing", choices=l2lbgdbgd.PREPROCESSINGS, default="scaled")
    parser.add_argument("--input-scale", type=float, default=1.0)
    parser.add_argument("--output-scale", type=float, default=1.0)
    parser.add_argument("--stop-input-gradients", action="store_true",
                        help="treat the LSTM's input gradients as constants (the paper's approximation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args(argv)


class Bowls:
    """The population's problems on the host: Hessians and the per-step center noise."""

    def __init__(self, args, rng: np.random.Generator):
        self.args, self.rng = args, rng
        self.eigenvalues = np.geomspace(args.eig_min, args.eig_max, args.dim)
        self.hessians = np.stack([self.fresh_hessian() for _ in range(args.batch)])

    def fresh_hessian(self) -> np.ndarray:
        q, r = np.linalg.qr(self.rng.standard_normal((self.args.dim, self.args.dim)))
        q = q * np.sign(np.diag(r))
        return ((q * self.eigenvalues) @ q.T).astype(np.float32)

    def noise(self, shape) -> np.ndarray:
        return (math.sqrt(self.args.noise_variance) * self.rng.standard_normal(shape)).astype(np.float32)


def make_meta_step(arch: l2lbgdbgd.Architecture, unroll: int, stop_input_gradients: bool):
    """The traced meta-iteration: unroll, meta-loss, clipped meta-gradient, one Adam step."""

    def meta_step(variables, adam_m, adam_v, adam_t, lr, clip, hess, theta, center, grad, state, noise):
        names = l2lbgdbgd.WEIGHT_NAMES
        with tf.GradientTape() as tape:
            weights = dict(zip(names, [v.read_value() for v in variables]))
            losses = []
            for t in range(unroll):
                step, state = l2lbgdbgd.apply(weights, state, grad, arch)
                theta = theta - step
                center = center + noise[t]
                d = theta - center
                hd = tf.linalg.matvec(hess, d)
                losses.append(0.5 * tf.reduce_sum(d * hd, axis=-1))
                grad = tf.stop_gradient(hd) if stop_input_gradients else hd
            meta_loss = tf.reduce_mean(tf.stack(losses))
        grads = tape.gradient(meta_loss, variables)
        grads, norm = tf.clip_by_global_norm(grads, clip)
        adam_t.assign_add(1.0)
        b1, b2, eps = 0.9, 0.999, 1e-8
        correction = tf.sqrt(1 - b2 ** adam_t) / (1 - b1 ** adam_t)
        for var, g, m, v in zip(variables, grads, adam_m, adam_v):
            m.assign(b1 * m + (1 - b1) * g)
            v.assign(b2 * v + (1 - b2) * g * g)
            var.assign_sub(lr * correction * m / (tf.sqrt(v) + eps))
        carry = tf.nest.map_structure(tf.stop_gradient, (theta, center, grad, state))
        return meta_loss, norm, carry

    # Not XLA: on CPU the compiled unroll took 20x longer to build and ran 2.5x slower per iteration.
    return tf.function(meta_step)


def meta_train(args, log=print) -> tuple[dict, l2lbgdbgd.Architecture, dict]:
    """Runs the meta-training; returns (weights, architecture, info)."""
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng([args.seed, META_STREAM])
    arch = l2lbgdbgd.Architecture(preprocessing=args.preprocessing, input_scale=args.input_scale,
                                  output_scale=args.output_scale)
    initial = l2lbgdbgd.init_weights(arch, rng)
    names = l2lbgdbgd.WEIGHT_NAMES
    variables = [tf.Variable(initial[k], name=k) for k in names]
    adam_m = [tf.Variable(tf.zeros_like(v)) for v in variables]
    adam_v = [tf.Variable(tf.zeros_like(v)) for v in variables]
    adam_t = tf.Variable(0.0)
    meta_step = make_meta_step(arch, args.unroll, args.stop_input_gradients)

    bowls = Bowls(args, rng)
    B, n = args.batch, args.dim
    theta = np.zeros((B, n), np.float32)
    center = np.zeros((B, n), np.float32)
    grad = np.zeros((B, n), np.float32)
    state = [[np.zeros((B, n, arch.hidden), np.float32) for _ in range(2)] for _ in range(2)]
    # Staggered ages: bowl b restarts at iterations ≡ −b·K/B (mod K), so restarts spread evenly.
    age = (np.arange(B) * args.reset_every) // B
    restart = np.ones(B, bool)  # iteration 0 starts every bowl, on the Hessians drawn above

    start, history, window = time.perf_counter(), [], []
    for it in range(args.iterations):
        for b in np.flatnonzero(restart):
            if it > 0:
                bowls.hessians[b] = bowls.fresh_hessian()
            theta[b] = 0.0
            center[b] = bowls.noise(n)  # the first center move, so the first gradient is a real one
            grad[b] = bowls.hessians[b] @ (theta[b] - center[b])
            for layer in state:
                for part in layer:
                    part[b] = 0.0
        lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * it / max(1, args.iterations))))
        noise = bowls.noise((args.unroll, B, n))
        meta_loss, norm, carry = meta_step(
            variables, adam_m, adam_v, adam_t, tf.constant(lr, tf.float32), tf.constant(args.clip, tf.float32),
            bowls.hessians, theta, center, grad, tuple(tuple(layer) for layer in state), noise)
        theta, center, grad = (np.array(x) for x in carry[:3])
        state = [[np.array(part) for part in layer] for layer in carry[3]]
        if not np.isfinite(meta_loss.numpy()):
            raise FloatingPointError(f"meta-loss became {meta_loss.numpy()} at iteration {it}; lower --lr")
        age += 1
        restart = age % args.reset_every == 0
        window.append(float(meta_loss))
        if (it + 1) % args.log_every == 0 or it + 1 == args.iterations:
            mean = float(np.mean(window))
            history.append((it + 1, mean))
            log(f"iter {it + 1:5d}/{args.iterations}  meta-loss {mean:9.4f}  |grad| {float(norm):8.3g}  "
                f"lr {lr:.2e}  {time.perf_counter() - start:6.1f} s")
            window = []
    wall = time.perf_counter() - start
    weights = {k: v.numpy() for k, v in zip(names, variables)}
    info = {
        "seed": args.seed, "iterations": args.iterations, "batch": B, "dim": n, "unroll": args.unroll,
        "reset_every": args.reset_every, "lr": args.lr, "clip": args.clip, "noise_variance": args.noise_variance,
        "eig_min": args.eig_min, "eig_max": args.eig_max, "stop_input_gradients": args.stop_input_gradients,
        "meta_loss_first": history[0][1] if history else float("nan"),
        "meta_loss_last": history[-1][1] if history else float("nan"),
        "wall_time_s": wall,
    }
    return weights, arch, info


def main(argv=None) -> None:
    args = parse_args(argv)
    weights, arch, info = meta_train(args)
    l2lbgdbgd.save(args.out, weights, arch, **info)
    print(f"saved {l2lbgdbgd.resolve(args.out)} (meta-training {info['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
