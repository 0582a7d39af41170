"""The paper's genetic-algorithm tuner (Appendix E; SPEC §4.1) as pure functions.

The search space is a transform of each hyperparameter: learning-rate-like
ones (``rate``) are searched as log(x), decay-like ones in [0, 1) (``decay``)
as log(1 − x). Generation g has a mean μ_g in that space and a noise std σ_g
from the schedule; its P individuals are μ_g + σ_g·N(0, I), each trained on
k seeds of its own (``seeds_per_individual``, per generation); the score is the
mean over those seeds of the training loss over the last 10% of the steps (NaN,
inf or a crash on any seed: the worst score); μ_{g+1} is the mean of the better
half. Generation 0 is centred on the current config values.

The paper's answer is the final mean. On a landscape whose best values sit at
an edge (a learning rate just below divergence) or in narrow bands, the better
half's centroid lands in a worse place than the best individuals, so an
optional final selection round re-scores the final mean and the best
individuals of the generations run at the final step count on fresh seeds,
optionally over a longer run (the bowl's ranking at 8000 steps is not its
ranking at 100k), and the best of them is the answer.

Nothing here trains or reads files: the Hydra sweeper
(``hydra_plugins/lodo_ga_sweeper``) launches the jobs and feeds their scores
in, and the tests drive the same functions with an analytic score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


class SweepError(ValueError):
    """A bad sweeper setting or sweep folder, reported as one line."""

KINDS = ("rate", "decay")
# log(1 − x) ≥ this keeps a decay strictly below 1 in float64 (1 − 1e-15 ≠ 1); log(1 − x) ≤ 0 keeps it ≥ 0.
DECAY_MIN_LOG = math.log(1e-15)
RATE_MAX_LOG = 700.0  # exp(±700) is still a finite float64
GA_STREAM = 0x6A  # the individuals' noise: its own random stream, keyed by (seed, stream, generation)


def check_kind(name: str, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"tune.{name}: unknown kind {kind!r}; use 'rate' (searched as log x) or 'decay' "
                         f"(searched as log(1 − x), for values in [0, 1))")


def to_search(value: float, kind: str, name: str = "value") -> float:
    """A hyperparameter's value → its coordinate in the search space."""
    value = float(value)
    if kind == "rate":
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{name} = {value!r} cannot be tuned as a rate (log x): it must be positive and finite")
        return math.log(value)
    if kind == "decay":
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} = {value!r} cannot be tuned as a decay (log(1 − x)): it must be in [0, 1)")
        return max(math.log1p(-value), DECAY_MIN_LOG)
    check_kind(name, kind)


def clip_search(z: float, kind: str) -> float:
    """The nearest coordinate whose value is valid: a decay in [0, 1), a rate finite and positive."""
    if kind == "decay":
        return min(max(float(z), DECAY_MIN_LOG), 0.0)
    return min(max(float(z), -RATE_MAX_LOG), RATE_MAX_LOG)


def from_search(z: float, kind: str) -> float:
    """A search-space coordinate → the hyperparameter's value."""
    z = clip_search(z, kind)
    return math.exp(z) if kind == "rate" else 0.0 - math.expm1(z)  # 0.0 − 0.0, not −0.0, at z = 0


@dataclass(frozen=True)
class Schedule:
    """Noise std and training steps of each generation (SPEC §4.1's table), and the population size."""

    name: str
    std: tuple
    steps: tuple
    population: int
    halve_rates_after: bool = False
    seeds_per_individual: tuple | int = 1  # one per generation (extended like std), or one for all
    final_candidates: int = 0  # best individuals re-scored beside the final mean; 0: the paper's final mean
    final_seeds: int = 1  # seeds per candidate in the final selection round
    final_steps: int | str | None = None  # its training steps; None: the last generation's; "task": the run's own

    def __post_init__(self):
        if len(self.std) != len(self.steps) or not self.std:
            raise ValueError(f"schedule {self.name!r}: std and steps need one entry per generation "
                             f"(got {len(self.std)} and {len(self.steps)})")
        if any(not s >= 0 for s in self.std) or any(int(n) != n or n < 1 for n in self.steps):
            raise ValueError(f"schedule {self.name!r}: std must be >= 0 and steps positive integers")
        if int(self.population) != self.population or self.population < 2:
            raise ValueError(f"schedule {self.name!r}: population must be an integer >= 2, got {self.population!r}")
        ks = self.seeds_per_individual if isinstance(self.seeds_per_individual, tuple) else (self.seeds_per_individual,)
        if not ks or any(not _positive_int(k) for k in ks):
            raise ValueError(f"schedule {self.name!r}: seeds_per_individual must be a positive integer or a list of "
                             f"them, got {self.seeds_per_individual!r}")
        if not _positive_int(self.final_candidates, zero=True):
            raise ValueError(f"schedule {self.name!r}: final_candidates must be an integer >= 0, got "
                             f"{self.final_candidates!r}")
        if not _positive_int(self.final_seeds):
            raise ValueError(f"schedule {self.name!r}: final_seeds must be a positive integer, got "
                             f"{self.final_seeds!r}")
        if not (self.final_steps is None or self.final_steps == "task" or _positive_int(self.final_steps)):
            raise ValueError(f"schedule {self.name!r}: final_steps must be a positive integer, 'task' or null, got "
                             f"{self.final_steps!r}")

    def plan(self, generations: int | None = None, steps: int | None = None) -> list[tuple[float, int]]:
        """(std, steps) per generation. Fewer generations take the schedule's first ones; more repeat its last."""
        count = len(self.std) if generations is None else int(generations)
        if count < 1:
            raise ValueError(f"generations must be a positive integer, got {generations!r}")
        if steps is not None and (int(steps) != steps or steps < 1):
            raise ValueError(f"steps must be a positive integer or null, got {steps!r}")
        last = len(self.std) - 1
        return [(float(self.std[min(g, last)]), int(steps if steps is not None else self.steps[min(g, last)]))
                for g in range(count)]

    def seeds(self, generations: int | None = None) -> list[int]:
        """Seeds per individual in each generation, shortened or extended as ``plan`` does."""
        return per_generation(self.seeds_per_individual, len(self.std) if generations is None else int(generations))


def _positive_int(value, zero: bool = False) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= (0 if zero else 1)


def per_generation(value, generations: int) -> list[int]:
    """An integer (every generation) or a list (one per generation; fewer repeat the last) → one per generation."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or any(not _positive_int(k) for k in values):
        raise ValueError(f"seeds_per_individual must be a positive integer or a list of them, got {value!r}")
    return [int(values[min(g, len(values) - 1)]) for g in range(int(generations))]


def generation_seeds(first_seed: int, population: int, ks: Sequence[int], generation: int) -> list[int]:
    """Generation g's seeds, individual i's k at [i·k, (i+1)·k): consecutive blocks after the earlier generations'."""
    start = int(first_seed) + int(population) * sum(int(k) for k in ks[:generation])
    return list(range(start, start + int(population) * int(ks[generation])))


def final_round_seeds(first_seed: int, population: int, ks: Sequence[int], candidates: int, seeds: int) -> list[int]:
    """The final round's fresh seeds, after every generation's: candidate c's at [c·seeds, (c+1)·seeds)."""
    start = int(first_seed) + int(population) * sum(int(k) for k in ks)
    return list(range(start, start + int(candidates) * int(seeds)))


def individual_scores(seed_scores: Sequence[float], k: int) -> np.ndarray:
    """Per-seed scores (individual i's k at [i·k, (i+1)·k)) → each individual's mean; any non-finite seed: inf."""
    s = np.asarray(seed_scores, dtype=np.float64).reshape(-1, int(k))
    with np.errstate(over="ignore", invalid="ignore"):
        mean = s.mean(axis=1)
    return np.where(np.isfinite(s).all(axis=1) & np.isfinite(mean), mean, np.inf)


def candidates(generations: Sequence[dict], mean: Sequence[float], count: int) -> tuple[np.ndarray, list]:
    """The final round's candidates: the final mean, then up to ``count`` best individuals.

    The individuals come from the generations run at the last generation's
    step count (an earlier, shorter generation's scores are not comparable),
    best score first, each distinct and finite. Returns ``(z [C, D], origins)``
    with origin None for the final mean and ``(generation, individual)`` else.
    """
    mean = np.asarray(mean, dtype=np.float64)
    steps = generations[-1]["steps"]
    pool = [(float(score), record["generation"], i, np.asarray(record["z"][i], dtype=np.float64))
            for record in generations if record["steps"] == steps
            for i, score in enumerate(record["scores"]) if score is not None and math.isfinite(score)]
    pool.sort(key=lambda entry: (entry[0], -entry[1], entry[2]))  # ties: the later generation, then the first index
    chosen, origins = [mean], [None]
    for _, generation, i, z in pool:
        if len(chosen) > count:
            break
        if not any(np.array_equal(z, c) for c in chosen):
            chosen.append(z)
            origins.append((int(generation), int(i)))
    return np.array(chosen), origins


def individuals(mean: Sequence[float], std: float, population: int, seed: int, generation: int,
                kinds: Sequence[str]) -> np.ndarray:
    """Generation ``generation``'s individuals ``[P, D]`` in the search space: mean + std·N(0, I), clipped to valid values.

    The noise depends only on (seed, generation), so a resumed sweep draws the same individuals.
    """
    rng = np.random.default_rng([int(seed), GA_STREAM, int(generation)])
    noise = rng.standard_normal((int(population), len(mean)))
    z = np.asarray(mean, dtype=np.float64)[None, :] + float(std) * noise
    return np.array([[clip_search(v, k) for v, k in zip(row, kinds)] for row in z])


def ranking(scores: Sequence[float]) -> np.ndarray:
    """Indices from best to worst; a non-finite score (NaN, inf, a crash) is the worst; ties keep the order."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.argsort(np.where(np.isfinite(scores), scores, np.inf), kind="stable")


def better_half_mean(z: np.ndarray, scores: Sequence[float]) -> np.ndarray:
    """The next generation's mean: the mean of the better half of ``z`` (at least one individual)."""
    z = np.asarray(z, dtype=np.float64)
    keep = ranking(scores)[:max(1, len(z) // 2)]
    return z[keep].mean(axis=0)


CURVE_TOLERANCE = 1e-8  # relative accuracy a curve row must have to be scored from


def window_score(ends: Sequence[int], losses: Sequence[float], total_steps: int, fraction: float) -> float | None:
    """Mean training loss over the last ``fraction`` of ``total_steps`` from a learning curve.

    Row j holds the mean loss over steps (ends[j−1], ends[j]] (the runner's
    ``curve.csv``); the rows are weighted by their overlap with the window.
    A non-finite loss anywhere, or a curve that stops short of the window
    (a run that ended early), scores inf.

    The runner computes a row as a difference of running sums, so after a
    transient of huge losses (an individual that ran away to 1e27 and came
    back) its later rows lose their digits, down to exactly 0. When the
    rounding error that the running sum allows, ε·Σ|loss| up to the row,
    exceeds ``CURVE_TOLERANCE`` of a window row, this returns None: the
    caller must take the score from elsewhere.
    """
    ends = np.asarray(ends, dtype=np.int64)
    losses = np.asarray(losses, dtype=np.float64)
    if not ends.size or not np.isfinite(losses).all():
        return math.inf
    order = np.argsort(ends)
    ends, losses = ends[order], losses[order]
    width = window_length(total_steps, fraction)
    start = total_steps - width
    starts = np.concatenate([[0], ends[:-1]])
    overlap = np.clip(np.minimum(ends, total_steps) - np.maximum(starts, start), 0, None)
    if overlap.sum() < width:
        return math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        running = np.cumsum(np.abs(losses) * (ends - starts))  # the running sum's magnitude at each row's end
        error = 4 * np.finfo(np.float64).eps * running / (ends - starts)  # absolute error of each row's mean
        used = overlap > 0
        if not np.isfinite(running[used]).all() or (error[used] > CURVE_TOLERANCE * np.abs(losses[used])).any():
            return None
        value = float((overlap * losses).sum() / width)
    return value if math.isfinite(value) else math.inf


def window_length(total_steps: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"score_window must be a fraction in (0, 1], got {fraction!r}")
    return max(1, int(round(fraction * total_steps)))


def minimize(score: Callable[[np.ndarray, int, np.ndarray], np.ndarray], center: Sequence[float],
             kinds: Sequence[str], plan: Sequence[tuple[float, int]], population: int, seed: int = 0,
             seeds_per_individual=1, first_seed: int = 0, final_candidates: int = 0,
             final_seeds: int = 1, final_steps: int | None = None) -> list[dict]:
    """The whole algorithm in memory: ``score(z [N, D], steps, seeds [N]) -> [N]`` per seed.

    Each individual's row of z comes k times, once per seed. Returns one
    record per generation (mean, std, individuals, scores), then the final
    record: the final mean, and with ``final_candidates`` the round's
    candidates, origins, per-seed and combined scores and choice (trained
    ``final_steps``, by default the last generation's); its ``result`` is
    the answer. The sweeper runs the same steps, with a saved
    state between generations.
    """
    mean = np.array([clip_search(c, k) for c, k in zip(center, kinds)], dtype=np.float64)
    ks = per_generation(seeds_per_individual, len(plan))
    records = []
    for g, (std, steps) in enumerate(plan):
        z = individuals(mean, std, population, seed, g, kinds)
        seeds = np.array(generation_seeds(first_seed, population, ks, g))
        per_seed = np.asarray(score(np.repeat(z, ks[g], axis=0), steps, seeds), dtype=np.float64)
        scores = individual_scores(per_seed, ks[g])
        records.append({"generation": g, "mean": mean, "std": std, "steps": steps, "z": z, "seeds": seeds,
                        "seed_scores": per_seed, "scores": scores})
        mean = better_half_mean(z, scores)
    final = {"generation": len(plan), "mean": mean, "result": mean}
    if final_candidates:
        z, origins = candidates(records, mean, final_candidates)
        seeds = np.array(final_round_seeds(first_seed, population, ks, len(z), final_seeds))
        steps = plan[-1][1] if final_steps is None else int(final_steps)
        per_seed = np.asarray(score(np.repeat(z, final_seeds, axis=0), steps, seeds), dtype=np.float64)
        scores = individual_scores(per_seed, final_seeds)
        choice = int(ranking(scores)[0])  # ties (all failed included): the final mean, listed first
        final.update(candidates=z, origins=origins, steps=steps, seeds=seeds, seed_scores=per_seed, scores=scores,
                     choice=choice, result=z[choice])
    records.append(final)
    return records


def summary_line(generation: int, generations: int, scores: Sequence[float]) -> str:
    """``gen 3/10: mean … best … std …`` over the finite scores, with the failures counted.

    Generations count from 0, as in SPEC §4.1's table (the last of 10 is ``gen 9/10``).
    """
    scores = np.asarray(scores, dtype=np.float64)
    ok = scores[np.isfinite(scores)]
    failed = len(scores) - len(ok)
    stats = (f"mean {ok.mean():.6g} best {ok.min():.6g} std {ok.std():.3g}" if ok.size
             else "mean – best – std –")
    return f"gen {generation}/{generations}: {stats}" + (f" ({failed} failed)" if failed else "")
