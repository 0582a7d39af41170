"""``GASweeper``: SPEC §4.1's genetic algorithm, each generation launched through the configured Hydra launcher.

``python -m lodo.run -m hydra/sweeper=ga task=rosenbrock optimizer=adam`` tunes
the optimizer's ``tune:`` hyperparameters (``configs/optimizer/<name>.yaml``)
with the task's schedule (``configs/hydra/sweeper/ga.yaml``). The algorithm
itself is ``lodo.experiment.genetic``; this module only turns generations into jobs,
jobs into scores, and keeps the sweep folder:

- ``ga_state.json``: the search state, rewritten atomically after every
  generation; the same command with the same ``hydra.sweep.dir`` continues
  at the next generation (the individuals' noise and seeds are fixed, so the
  result equals an uninterrupted sweep);
- ``ga.log``: one line per generation (``gen 3/10: mean … best … std …``),
  then the final selection round's candidates and its choice;
- ``tuned.yaml``: the result, in the format of ``configs/tuned/<task>/<optimizer>.yaml``;
- ``tuning.png`` / ``tuning.pdf``: every generation's scores and the hyperparameter trajectory;
- ``gen_<g>/`` (small tasks: one job runs the whole generation, k seeds per
  individual, with per-seed hyperparameter lists) or ``gen_<g>/ind_<i>/``
  (image tasks: one job per individual): the runs themselves; ``final/``
  (or ``final/ind_<c>/``) the final round's.

Only the standard library, OmegaConf and Hydra are imported at module level:
Hydra imports every plugin module whenever the app starts.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction

# Defined outside this module: Hydra's plugin scan re-executes plugin modules in place, which would
# make a new SweepError class that no earlier `except SweepError` could catch.
from lodo.experiment.genetic import SweepError  # noqa: F401

log = logging.getLogger(__name__)

STATE_FILE = "ga_state.json"
LOG_FILE = "ga.log"
TUNED_FILE = "tuned.yaml"
PLOT_STEM = "tuning"
EXPORTED = (STATE_FILE, LOG_FILE, TUNED_FILE, f"{PLOT_STEM}.png", f"{PLOT_STEM}.pdf")
STATE_FORMAT = 2  # 2: seeds_per_individual and the final selection round (a format-1 state is their absence)
NEW_SETTINGS = ("seeds_per_individual", "final_candidates", "final_seeds", "final_steps")  # the setup's keys since format 2
# Set by the sweeper for every generation; the setting that controls each instead.
RESERVED = {"seed": "hydra.sweeper.first_seed", "num_seeds": "hydra.sweeper.population",
            "steps": "hydra.sweeper.steps"}


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def quote(value: str) -> str:
    """A string as a quoted Hydra override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def number(value: float) -> str:
    """A float as an override value that parses back to the same float (repr round-trips)."""
    return repr(float(value))


class GASweeper(Sweeper):
    def __init__(self, schedule: Optional[str] = None, population: Optional[int] = None,
                 generations: Optional[int] = None, steps: Optional[int] = None, score_window: float = 0.1,
                 seed: int = 0, first_seed: int = 1000, halve_rates_after: Optional[bool] = None,
                 rate_keys: Any = ("learning_rate", "initial_lr", "eta0"), search_space: Any = None,
                 stop_after: Optional[int] = None, install: Any = False, export_dir: Optional[str] = None,
                 job_overrides: Any = (), schedules: Any = None, seeds_per_individual: Any = None,
                 final_candidates: Optional[int] = None, final_seeds: Optional[int] = None,
                 final_steps: Any = None) -> None:
        super().__init__()
        self.schedule_name = schedule
        self.population, self.generations, self.steps = population, generations, steps
        self.seeds_per_individual = _plain(seeds_per_individual)
        self.final_candidates, self.final_seeds, self.final_steps = final_candidates, final_seeds, final_steps
        self.score_window, self.seed, self.first_seed = score_window, seed, first_seed
        self.halve_rates_after = halve_rates_after
        self.rate_keys = list(_plain(rate_keys) or [])
        self.search_space = _plain(search_space)
        self.stop_after, self.install, self.export_dir = stop_after, install, export_dir
        self.job_overrides = [str(o) for o in (_plain(job_overrides) or [])]
        self.schedules = dict(_plain(schedules) or {})
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        try:
            return self._sweep(list(arguments))
        except SweepError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    # ------------------------------------------------------------------ setup
    def _check_settings(self) -> None:
        for key in ("population", "generations", "steps", "stop_after", "final_seeds"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SweepError(f"hydra.sweeper.{key} must be a positive integer or null, got {value!r}")
        k = self.seeds_per_individual
        if k is not None and not (_count(k) or (isinstance(k, list) and k and all(_count(v) for v in k))):
            raise SweepError(f"hydra.sweeper.seeds_per_individual must be a positive integer, a list of them (one per "
                             f"generation) or null, got {k!r}")
        if self.final_candidates is not None and not _count(self.final_candidates, zero=True):
            raise SweepError(f"hydra.sweeper.final_candidates must be a non-negative integer or null, got "
                             f"{self.final_candidates!r}")
        if not (self.final_steps is None or self.final_steps == "task" or _count(self.final_steps)):
            raise SweepError(f"hydra.sweeper.final_steps must be a positive integer, 'task' (the run's steps) or null, "
                             f"got {self.final_steps!r}")
        if self.population is not None and self.population < 2:
            raise SweepError(f"hydra.sweeper.population must be at least 2, got {self.population}")
        for key in ("seed", "first_seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SweepError(f"hydra.sweeper.{key} must be a non-negative integer, got {value!r}")
        window = self.score_window
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window <= 1:
            raise SweepError(f"hydra.sweeper.score_window must be a fraction in (0, 1], got {window!r}")
        if self.install not in (False, True, "overwrite"):
            raise SweepError(f"hydra.sweeper.install must be false, true or overwrite, got {self.install!r}")
        if self.halve_rates_after not in (None, True, False):
            raise SweepError(f"hydra.sweeper.halve_rates_after must be true, false or null, got "
                             f"{self.halve_rates_after!r}")

    def _parse_arguments(self, arguments: List[str]) -> list:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(arguments)
        for override in overrides:
            key = override.key_or_group.lstrip("+~")
            if override.is_sweep_override():
                raise SweepError(f"the GA sweeper tunes one configuration, but {override.input_line!r} is a sweep: "
                                 f"run one GA sweep per value")
            if key in RESERVED:
                raise SweepError(f"{key} is set by the GA sweeper for every generation; use {RESERVED[key]} instead")
        return overrides

    def _schedule(self, task_name: str, task_schedule):
        from lodo.experiment import genetic

        name = self.schedule_name or task_schedule
        if name is None:
            raise SweepError(f"no GA schedule for task {task_name!r}: pick one with hydra.sweeper.schedule="
                             f"<{'|'.join(sorted(self.schedules))}> or give the task's YAML a ga_schedule")
        if name not in self.schedules:
            raise SweepError(f"unknown GA schedule {name!r}; valid schedules: {', '.join(sorted(self.schedules))}")
        entry = self.schedules[name]
        try:
            k = entry.get("seeds_per_individual", 1) if self.seeds_per_individual is None else self.seeds_per_individual
            return genetic.Schedule(name, tuple(entry["std"]), tuple(entry["steps"]),
                                    int(self.population or entry["population"]),
                                    bool(entry.get("halve_rates_after", False)),
                                    tuple(k) if isinstance(k, list) else k,
                                    _first(self.final_candidates, entry.get("final_candidates", 0)),
                                    _first(self.final_seeds, entry.get("final_seeds", 1)),
                                    _first(self.final_steps, entry.get("final_steps")))
        except (KeyError, TypeError, ValueError) as err:
            raise SweepError(f"GA schedule {name!r}: {err}") from None

    def _search_space(self, optimizer: DictConfig) -> dict:
        from lodo.experiment import genetic

        name = optimizer.get("name")
        space = self.search_space if self.search_space is not None else _plain(optimizer.get("tune"))
        if not space:
            raise SweepError(f"optimizer {name!r} has no tune: block (configs/optimizer/{name}.yaml) to say what to "
                             f"tune; add one, or give hydra.sweeper.search_space='{{learning_rate: rate}}'")
        if not isinstance(space, dict):
            raise SweepError(f"the search space must map hyperparameters to rate or decay, got {space!r}")
        for key, kind in space.items():
            try:
                genetic.check_kind(key, kind)
            except ValueError as err:
                raise SweepError(str(err)) from None
            if key not in optimizer or key in ("name", "tune"):
                raise SweepError(f"tune.{key}: optimizer {name!r} has no hyperparameter {key!r}")
        return dict(space)

    def _install_target(self, task: str, optimizer: str, untuned: tuple = ()) -> Optional[Path]:
        """Where install writes; ``untuned``: hyperparameters of the optimizer's tune: block this search leaves out."""
        if self.install is False:
            return None
        sources = _plain(self.config.hydra.runtime.config_sources) or []
        main = [s for s in sources if s.get("provider") == "main" and s.get("schema") == "file"]
        if not main:
            raise SweepError("hydra.sweeper.install needs the app's config directory on disk (a file config source)")
        target = Path(main[0]["path"]) / "tuned" / task / f"{optimizer}.yaml"
        if target.exists() and self.install != "overwrite":
            raise SweepError(f"{target} exists (it may hold the paper's values); hydra.sweeper.install=overwrite "
                             f"replaces it, or leave install off and copy tuned.yaml by hand")
        if target.exists() and untuned:
            raise SweepError(f"this search leaves out {', '.join(untuned)}, so installing its tuned.yaml would drop "
                             f"their values from {target}: leave install off and copy tuned.yaml's values by hand")
        return target

    # ------------------------------------------------------------------ sweep
    def _sweep(self, arguments: List[str]) -> Any:
        from lodo.experiment import genetic, outputs, registry

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        self._check_settings()
        overrides = self._parse_arguments(arguments)
        base = self.hydra_context.config_loader.load_sweep_config(self.config, list(arguments))
        task_name, optimizer_name = str(base.task.name), str(base.optimizer.name)
        space = self._search_space(base.optimizer)
        keys, kinds = list(space), [space[k] for k in space]
        self._bounds = _numeric_limits(registry.optimizer(optimizer_name).limits, keys)
        center = []
        for key, kind in zip(keys, kinds):
            value = base.optimizer[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SweepError(f"optimizer.{key} must be a number to centre generation 0 on, got {value!r}")
            try:
                genetic.to_search(value, kind, f"optimizer.{key}")
            except ValueError as err:
                raise SweepError(str(err)) from None
            center.append(float(value))
        schedule = self._schedule(task_name, base.task.get("ga_schedule"))
        try:
            plan = schedule.plan(self.generations, self.steps)
        except ValueError as err:
            raise SweepError(f"hydra.sweeper: {err}") from None
        population = schedule.population
        ks = schedule.seeds(len(plan))
        final_count = int(schedule.final_candidates)
        final_seeds = int(schedule.final_seeds) if final_count else 0
        final_steps = ({None: plan[-1][1], "task": int(base.steps)}.get(schedule.final_steps, schedule.final_steps)
                       if final_count else 0)
        halve = schedule.halve_rates_after if self.halve_rates_after is None else bool(self.halve_rates_after)
        # One job per individual where a generation cannot be one multi-seed program: image tasks train one
        # model per job, and an optimizer without per-seed hyperparameters cannot give each seed its own values.
        image = registry.is_image_task(task_name)
        separate = image or not registry.optimizer(optimizer_name).per_seed
        untuned = tuple(k for k in (_plain(base.optimizer.get("tune")) or {}) if k not in space)
        install_target = self._install_target(task_name, optimizer_name, untuned)

        if self.export_dir:
            from lodo.experiment.report import output_problem

            problem = output_problem(Path(str(self.export_dir)), "hydra.sweeper.export_dir")
            if problem:
                raise SweepError(problem)

        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        setup = json.loads(json.dumps({
            "task": task_name, "optimizer": optimizer_name, "arguments": list(arguments), "search_space": space,
            "center": center, "schedule": schedule.name, "population": population, "plan": plan,
            "seed": self.seed, "first_seed": self.first_seed, "score_window": self.score_window,
            "one_job_per_individual": separate, "job_overrides": self.job_overrides, "seeds_per_individual": ks,
            "final_candidates": final_count, "final_seeds": final_seeds, "final_steps": final_steps}))
        state_path = sweep_dir / STATE_FILE
        state = load_state(state_path, setup)  # before anything is written: a damaged state stops the sweep
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's basic sweeper does
        if state is not None and len(state["generations"]) == len(plan) and (state.get("final") or not final_count):
            self._log(sweep_dir, f"all {len(plan)} generations are done; writing the results again")
        elif state is not None and len(state["generations"]) == len(plan):
            self._log(sweep_dir, f"resuming at the final selection round")
        elif state is not None:
            self._log(sweep_dir, f"resuming at generation {len(state['generations'])}/{len(plan)}")
        else:
            mean = [genetic.clip_search(genetic.to_search(v, k), k) for v, k in zip(center, kinds)]
            state = {"format": STATE_FORMAT, "setup": setup, "generations": [], "mean": mean, "jobs_launched": 0,
                     "started": _now()}
            seeds = _seed_count(ks)
            final = (f"; then a final round: the final mean and the best {final_count} individuals on {final_seeds} "
                     f"fresh seeds each, {final_steps} steps" if final_count else "; the result is the final mean")
            self._log(sweep_dir, f"GA on {task_name} / {optimizer_name}: {len(plan)} generations x {population} "
                                 f"individuals x {seeds} each, schedule {schedule.name}, tuning {', '.join(keys)} from "
                                 + ", ".join(f"{k}={v:.6g}" for k, v in zip(keys, center)) + final)
            outputs.write_json(state_path, state)

        # The user's overrides stay in every job, except those of the tuned keys (they set the centre).
        tuned_keys = {f"optimizer.{k}" for k in keys}
        kept = [a for a, o in zip(arguments, overrides) if o.key_or_group.lstrip("+~") not in tuned_keys]
        stop = len(plan) if self.stop_after is None else min(len(plan), int(self.stop_after))
        returns = []
        for g in range(len(state["generations"]), stop):
            std, steps = plan[g]
            z = genetic.individuals(state["mean"], std, population, self.seed, g, kinds)
            values = self._values(z, keys, kinds)
            seeds = genetic.generation_seeds(self.first_seed, population, ks, g)
            scores, seed_scores, walls, folders, results = self._run_generation(
                g, steps, keys, values, seeds, image, separate, kept, sweep_dir, state)
            wall = sum(walls)
            state["generations"].append({
                "generation": g, "std": std, "steps": steps, "mean": list(state["mean"]), "z": z.tolist(),
                "values": values, "seeds": seeds, "seeds_per_individual": ks[g], "seed_scores": seed_scores,
                "scores": scores, "wall_s": wall, "retry_wall_s": sum(walls[1:]),
                "jobs": [str(Path(folder).relative_to(sweep_dir)) for folder in folders], "finished": _now()})
            state["mean"] = genetic.better_half_mean(z, scores).tolist()
            outputs.write_json(state_path, state)
            retried = f", {sum(walls[1:]):.1f} s of it re-running crashed jobs" if len(walls) > 1 else ""
            self._log(sweep_dir, genetic.summary_line(g, len(plan), scores) + f" ({wall:.1f} s{retried})")
            returns.append(results)

        if len(state["generations"]) < len(plan):
            self._plot(state, keys, kinds, sweep_dir)  # once per invocation: it takes seconds
            self._log(sweep_dir, f"stopped after generation {len(state['generations']) - 1} (hydra.sweeper.stop_after="
                                 f"{self.stop_after}); run the same command again to continue")
            return returns
        if final_count and not state.get("final"):
            returns.append(self._final_round(state, keys, kinds, final_count, final_seeds, image, separate, kept,
                                             sweep_dir, state_path))
        dataset = base.task.get("dataset")  # the image-generation task trains on MNIST or Fashion-MNIST
        where = f"{task_name} ({dataset})" if dataset else task_name
        tuned = self._finish(state, keys, kinds, schedule, halve, where, optimizer_name, sweep_dir, install_target)
        self._log(sweep_dir, "tuned: " + ", ".join(f"{k}={v:.6g}" for k, v in tuned.items()))
        return returns

    def _final_round(self, state, keys, kinds, count, seeds_each, image, separate, kept, sweep_dir, state_path):
        """Re-scores the final mean and the best ``count`` individuals on fresh seeds; the best is the result.

        Saved as the state's ``final`` record (a resumed sweep skips a finished
        round); ties go to the final mean, which is listed first.
        """
        from lodo.experiment import genetic, outputs

        setup = state["setup"]
        gens = [dict(r, scores=[math.inf if v is None else v for v in r["scores"]]) for r in state["generations"]]
        z, origins = genetic.candidates(gens, state["mean"], count)
        values = self._values(z, keys, kinds)
        seeds = genetic.final_round_seeds(self.first_seed, setup["population"], setup["seeds_per_individual"],
                                          len(z), seeds_each)
        steps = int(setup.get("final_steps") or gens[-1]["steps"])
        scores, seed_scores, walls, folders, results = self._run_generation(
            "final", steps, keys, values, seeds, image, separate, kept, sweep_dir, state)
        choice = int(genetic.ranking(scores)[0])
        state["final"] = {
            "steps": steps, "z": z.tolist(), "values": values,
            "origins": [None if o is None else list(o) for o in origins],
            "origin_scores": [None if o is None else gens[o[0]]["scores"][o[1]] for o in origins],
            "seeds": seeds, "seeds_per_individual": seeds_each, "seed_scores": seed_scores, "scores": scores,
            "choice": choice, "wall_s": sum(walls), "retry_wall_s": sum(walls[1:]),
            "jobs": [str(Path(folder).relative_to(sweep_dir)) for folder in folders], "finished": _now()}
        outputs.write_json(state_path, state)
        for c, (origin, score) in enumerate(zip(origins, scores)):
            self._log(sweep_dir, f"final round: {_origin(origin, gens)}: {_fmt(score)} on seeds {seeds[c * seeds_each]}"
                                 f"-{seeds[(c + 1) * seeds_each - 1]} ("
                                 + ", ".join(f"{k}={v:.6g}" for k, v in zip(keys, values[c])) + ")")
        self._log(sweep_dir, f"final round ({sum(walls):.1f} s): the result is {_origin(origins[choice], gens)}, "
                             f"score {_fmt(scores[choice])} (the final mean's: {_fmt(scores[0])})")
        return results

    def _values(self, z, keys, kinds) -> list:
        """The hyperparameter values of search-space rows, each moved inside its YAML limit where the
        transform reaches a bound the optimizer refuses (a decay of exactly 0 for Lion's β1 ∈ (0, 1])."""
        from lodo.experiment import genetic

        bounds = getattr(self, "_bounds", {})

        def value(key, coordinate, kind):
            found = genetic.from_search(coordinate, kind)
            return bounds[key].nearest(found) if key in bounds else found

        return [[value(k, v, kind) for k, v, kind in zip(keys, row, kinds)] for row in z]

    def _run_generation(self, g, steps, keys, values, seeds, image, separate, kept, sweep_dir, state):
        """Launches a generation's jobs (g: its number, or "final" for the final round).

        Returns (scores per individual, scores per seed, wall seconds per
        round of jobs, run folders, job returns). Individual i trains the k =
        len(seeds) / len(values) seeds at [i·k, (i+1)·k); its score is their
        mean, the worst if any of them failed.

        A job that crashes takes every individual in it down with it; on the
        small tasks, where one job runs many individuals, its individuals are
        split in halves and launched again, until the crash is pinned on single
        individuals, which score worst. (A job that stops the whole app, such
        as a configuration error, stops the sweep instead.)
        """
        from lodo.experiment import genetic

        k = len(seeds) // len(values)
        seed_scores = [math.inf] * len(seeds)
        ranges = [(0, len(values))] if not separate else [(i, i + 1) for i in range(len(values))]
        walls, folders, returns = [], [], []
        while ranges:
            jobs = [self._job(g, steps, keys, values, seeds, lo, hi, image, separate, kept, sweep_dir)
                    for lo, hi in ranges]
            batch = [overrides for overrides, _ in jobs]
            self.validate_batch_is_legal(batch)
            tic = time.perf_counter()
            results = self.launcher.launch(batch, initial_job_idx=state["jobs_launched"])
            walls.append(time.perf_counter() - tic)
            state["jobs_launched"] += len(batch)
            returns.extend(results)
            retry = []
            for (lo, hi), (_, folder), result in zip(ranges, jobs, results):
                folders.append(folder)
                if result.status == JobStatus.COMPLETED:
                    for i, score in self._scores(folder, range(lo * k, hi * k), seeds, steps).items():
                        seed_scores[i] = score
                    continue
                error = f"{type(result._return_value).__name__}: {result._return_value}"
                where = "final round" if g == "final" else f"gen {g}"
                if hi - lo > 1:
                    retry += [(lo, (lo + hi) // 2), ((lo + hi) // 2, hi)]
                    log.warning(f"{where}: the job of individuals {lo}-{hi - 1} failed ({error}); running each half "
                                f"on its own to find the individuals that fail")
                else:
                    log.warning(f"{where}: individual {lo} failed ({error}); it scores worst")
            ranges = retry
        scores = genetic.individual_scores(seed_scores, k).tolist()
        return scores, seed_scores, walls, folders, returns

    def _job(self, g, steps, keys, values, seeds, lo, hi, image, separate, kept, sweep_dir):
        """(overrides, run folder) of the job that trains individuals lo … hi−1 (k = len(seeds) / len(values) each).

        On the small tasks the individuals' values are per-seed lists (each
        value k times); the whole generation is one job in ``gen_<g>/``, and a
        split-off part (after a crash) goes to ``gen_<g>/ind_<lo>-<hi−1>/``
        (``ind_<i>`` for one). An image-task job, or one of an optimizer without
        per-seed hyperparameters, trains one individual's k seeds in
        ``gen_<g>/ind_<i>/``. The final round (g = "final") runs in ``final/``.
        """
        from lodo.experiment import genetic

        k = len(seeds) // len(values)
        window = genetic.window_length(steps, self.score_window)
        log_every = math.gcd(steps, window)  # curve rows that tile the score window exactly
        common = [*kept, f"steps={steps}", f"log_every={log_every}", *self.job_overrides,
                  f"hydra.sweep.dir={quote(sweep_dir)}", f"seed={seeds[lo * k]}", f"num_seeds={(hi - lo) * k}"]
        top = g if isinstance(g, str) else f"gen_{g:02d}"
        if separate:
            subdir = f"{top}/ind_{lo:02d}"
            # The score is the training loss: no pictures, and a one-image test set instead of the minutes that a
            # full one costs (the summary keeps its test fields).
            settings = (["artifacts=false", "test_size=1"] if image else [f"chunk_size={steps}"]) + [
                f"optimizer.{key}={number(values[lo][d])}" for d, key in enumerate(keys)]
        else:
            part = f"ind_{lo:02d}" if hi - lo == 1 else f"ind_{lo:02d}-{hi - 1:02d}"
            subdir = top if (lo, hi) == (0, len(values)) else f"{top}/{part}"
            # One compiled chunk for the whole run: no host round trips in between, and no progress report
            # while a runaway individual's loss passes through values that the runner cannot log.
            settings = [f"chunk_size={steps}"] + [
                f"optimizer.{key}=[{','.join(number(row[d]) for row in values[lo:hi] for _ in range(k))}]"
                for d, key in enumerate(keys)]
        return [*common, *settings, f"hydra.sweep.subdir={subdir}"], sweep_dir / subdir

    def _scores(self, folder: Path, members, seeds, steps) -> dict:
        """Individual → score from the run's ``curve.csv`` (rows per seed); a missing curve scores worst.

        Where the curve's rows are too inexact to score (``genetic.window_score``
        returns None), the run's own figure from ``summary.json`` is used: an
        exact mean over the task's report window (the bowl: the last 1% of the
        steps; Rosenbrock: the last 10%, steps 180–200 at 200 steps).
        """
        import pandas as pd

        from lodo.experiment import genetic

        path = Path(folder) / "curve.csv"
        if not path.is_file():
            log.warning(f"{path} is missing; its individuals score worst")
            return {}
        try:
            curve = pd.read_csv(path)
            if not {"seed", "step", "loss"} <= set(curve.columns):
                raise ValueError("no seed, step and loss columns")
            for column in ("seed", "step", "loss"):
                curve[column] = pd.to_numeric(curve[column])
        except (OSError, ValueError) as err:  # a foreign or damaged file: never the sweep's end
            log.warning(f"{path} is unreadable ({' '.join(str(err).split())[:100]}); its individuals score worst")
            return {}
        summary = _read_json(Path(folder) / "summary.json")
        run_seeds, losses = summary.get("seeds"), summary.get("loss_final_per_seed")
        usable = isinstance(run_seeds, list) and isinstance(losses, list) and all(type(s) is int for s in run_seeds)
        fallback = {s: v for s, v in zip(run_seeds, losses) if type(v) in (int, float)} if usable else {}
        scores = {}
        for i in members:
            rows = curve[curve["seed"] == seeds[i]]
            score = genetic.window_score(rows["step"].to_numpy(), rows["loss"].to_numpy(), steps, self.score_window)
            if score is None:
                exact = fallback.get(seeds[i])
                score = math.inf if exact is None or not math.isfinite(exact) else float(exact)
                log.info(f"seed {seeds[i]}: its curve.csv rows lost their precision after a transient of huge "
                         f"losses; scored by summary.json's report window instead ({score:.6g})")
            scores[i] = score
        return scores

    # ------------------------------------------------------------------ outputs
    def _log(self, sweep_dir: Path, line: str) -> None:
        log.info(line)
        with open(sweep_dir / LOG_FILE, "a") as f:
            f.write(f"{_now()} {line}\n")

    def _finish(self, state, keys, kinds, schedule, halve, task, optimizer, sweep_dir, install_target) -> dict:
        from lodo.experiment import genetic, outputs

        final = state.get("final")
        result = final["z"][final["choice"]] if final else state["mean"]
        tuned = dict(zip(keys, self._values([result], keys, kinds)[0]))
        halved = [k for k in keys if halve and k in self.rate_keys]
        for k in halved:
            tuned[k] /= 2
        last = state["generations"][-1]
        scores = [math.inf if s is None else s for s in last["scores"]]
        order = genetic.ranking(scores)
        half = [scores[i] for i in order[:max(1, len(scores) // 2)]]
        setup = state["setup"]
        plan = setup["plan"]
        steps = sorted({int(s) for _, s in plan})
        seeds = _seed_count(setup.get("seeds_per_individual") or [1] * len(plan))
        lines = [
            "# @package optimizer",
            f"# Tuned by this project's genetic algorithm (SPEC §4.1; python -m lodo.run -m hydra/sweeper=ga) "
            f"on {task}, {_now()[:10]}.",
            f"# Schedule {schedule.name}: {len(plan)} generations x {setup['population']} individuals x {seeds} "
            f"each, {', '.join(str(s) for s in steps)} steps; generation 0 centred on "
            + ", ".join(f"{k}={v:.6g}" for k, v in zip(keys, setup["center"])) + ".",
            f"# Score (mean training loss over the last {self.score_window:g} of the steps, averaged over an "
            f"individual's seeds), last generation: better half {_fmt(sum(half) / len(half))}, best "
            f"{_fmt(min(scores))}." + ("" if final else " Values: the final mean."),
        ]
        if final:
            gens = state["generations"]
            chosen = final["choice"]
            lines.append(
                f"# Values: {_origin(final['origins'][chosen], gens)}, the best of a final round that re-scored the "
                f"final mean and the best {len(final['z']) - 1} individuals on {final['seeds_per_individual']} fresh "
                f"seeds each at {final['steps']} steps: {_fmt(_score(final['scores'][chosen]))} (the final mean: "
                f"{_fmt(_score(final['scores'][0]))}).")
        if halved:
            lines.append(f"# {', '.join(halved)} halved after tuning (hydra.sweeper.halve_rates_after), as the paper "
                         f"did for image generation.")
        lines += [f"{k}: {_yaml_number(v, kind)}" for k, v, kind in zip(keys, tuned.values(), kinds)]
        text = "\n".join(lines) + "\n"
        outputs.atomic_write_text(sweep_dir / TUNED_FILE, text)
        self._plot(state, keys, kinds, sweep_dir)
        if install_target is not None:
            outputs.atomic_write_text(install_target, text)
            self._log(sweep_dir, f"installed {install_target}")
        if self.export_dir:
            export = Path(str(self.export_dir))
            export.mkdir(parents=True, exist_ok=True)
            for name in EXPORTED:
                if (sweep_dir / name).is_file() and (sweep_dir / name).resolve() != (export / name).resolve():
                    shutil.copyfile(sweep_dir / name, export / name)
        return tuned

    def _plot(self, state, keys, kinds, sweep_dir: Path) -> None:
        """Scores per generation and each hyperparameter's trajectory (PNG and PDF); a failure only warns."""
        try:
            self._draw(state, keys, kinds, sweep_dir)
        except Exception as err:  # the figure must never cost the sweep its result
            log.warning(f"the tuning plot failed ({type(err).__name__}: {err}); the results are unaffected")

    def _draw(self, state, keys, kinds, sweep_dir: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.ticker import MaxNLocator

        from lodo.experiment import genetic

        gens = state["generations"]
        fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.2 * (1 + len(keys)), 3.6), squeeze=False)
        ax = axes[0, 0]
        finite = [v for r in gens for v in r["scores"] if v is not None and math.isfinite(v)]
        log_scale = bool(finite) and min(finite) > 0
        # Scores of runaway runs (1e270 is possible in float64) sit on a ceiling, failures just above it.
        ceiling = (min(finite) * 1e6 if log_scale else max(finite)) if finite else 1.0
        best, middle, failure_label = [], [], "failed (NaN/inf)"
        for record in gens:
            s = np.array([np.inf if v is None else v for v in record["scores"]], dtype=float)
            ok = s[np.isfinite(s)]
            x = record["generation"]
            ax.scatter(np.full(ok.size, x), np.minimum(ok, ceiling), s=8, alpha=0.4, color="tab:blue")
            if ok.size < s.size:
                ax.scatter([x] * (s.size - ok.size), [ceiling * (2 if log_scale else 1)] * (s.size - ok.size), s=12,
                           marker="x", color="tab:red", label=failure_label)
                failure_label = None
            best.append(ok.min() if ok.size else np.nan)
            middle.append(min(np.median(ok), ceiling) if ok.size else np.nan)
        g = [r["generation"] for r in gens]
        ax.plot(g, best, "o-", color="tab:red", label="best")
        ax.plot(g, middle, "s--", color="tab:gray", label="median")
        selection = state.get("final")
        if selection:  # the final round's candidates one step right of the last generation, its choice starred
            s = np.array([np.inf if v is None else v for v in selection["scores"]], dtype=float)
            ok = np.isfinite(s)
            x = len(gens)
            ax.scatter(np.full(ok.sum(), x), np.minimum(s[ok], ceiling), s=14, color="tab:green",
                       label=f"final round ({selection['seeds_per_individual']} seeds)")
            if np.isfinite(s[selection["choice"]]):
                ax.scatter([x], [min(s[selection["choice"]], ceiling)], s=90, marker="*", color="tab:green",
                           edgecolor="black", zorder=3, label="result")
        if log_scale:
            ax.set_yscale("log")
        ax.set(xlabel="generation", ylabel="score (training loss)", title=f"{state['setup']['optimizer']} on "
               f"{state['setup']['task']}")
        ax.legend(fontsize=8)
        for d, (key, kind) in enumerate(zip(keys, kinds)):
            ax = axes[0, 1 + d]

            def shown(value, kind=kind):
                return 1 - value if kind == "decay" else value

            for record in gens:
                v = [shown(row[d]) for row in record["values"]]
                ax.scatter(np.full(len(v), record["generation"]), v, s=8, alpha=0.3, color="tab:blue")
            means = [shown(genetic.from_search(r["mean"][d], kind)) for r in gens]
            final = shown(genetic.from_search(state["mean"][d], kind))
            ax.plot(g + [len(gens)], means + [final], "o-", color="tab:red", label="generation mean")
            if state.get("final"):
                chosen = state["final"]["z"][state["final"]["choice"]][d]
                ax.scatter([len(gens)], [shown(genetic.from_search(chosen, kind))], s=90, marker="*",
                           color="tab:green", edgecolor="black", zorder=3, label="result (final round)")
            ax.set_yscale("log")
            ax.set(xlabel="generation", ylabel=f"1 − {key}" if kind == "decay" else key, title=key)
            ax.legend(fontsize=8)
        for ax in axes.flat:  # generations are whole numbers: no 0.2, 0.4 ticks on a two-generation schedule
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        for suffix in ("png", "pdf"):
            tmp = sweep_dir / f".{PLOT_STEM}.tmp.{suffix}"
            fig.savefig(tmp, dpi=120)
            tmp.replace(sweep_dir / f"{PLOT_STEM}.{suffix}")  # atomic, like lodo.outputs
        plt.close(fig)


def _numeric_limits(texts: dict, keys) -> dict:
    """The tuned keys' YAML limits that bound a number (``lodo.experiment.limits``)."""
    from lodo.experiment import limits

    found = {}
    for key in keys:
        try:
            limit = limits.parse(texts.get(key))
        except (ValueError, TypeError):
            continue
        if limit.kind != "list" and (limit.low is not None or limit.high is not None):
            found[key] = limit
    return found


def load_state(path: Path, setup: dict) -> Optional[dict]:
    """The saved search state of a sweep with exactly these settings, None if there is none, else a SweepError.

    A damaged file (unreadable, not JSON, or JSON of another shape) is refused in one line naming it; it is
    never replaced or deleted here, since it may hold generations that took hours.
    """
    aside = (f"move it aside (e.g. to {path.name}.damaged) to start the sweep afresh in this folder, or give a new "
             f"hydra.sweep.dir")
    if not os.path.lexists(path):
        return None
    if not path.is_file():
        raise SweepError(f"{path} is not a file (a folder or a broken link), so the sweep cannot keep its state "
                         f"there: {aside}")
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise SweepError(f"cannot read {path} ({err.strerror}): make it readable to continue the sweep, or "
                         f"{aside}") from None
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON (a truncated write, garbage)
        reason = " ".join(str(err).split())[:100] or type(err).__name__
        raise SweepError(f"{path} is damaged (not JSON: {reason}): {aside}") from None
    if not isinstance(state, dict):
        raise SweepError(f"{path} is damaged (a JSON {type(state).__name__}, not the GA state's object): {aside}")
    stored = state.get("setup")
    if state.get("format") == 1 and isinstance(stored, dict) and isinstance(stored.get("plan"), list):
        # Format 1 had one seed per individual and the final mean as the result: it continues as that sweep.
        old = dict(stored, seeds_per_individual=[1] * len(stored["plan"]), final_candidates=0, final_seeds=0,
                   final_steps=0)
        if old == setup:
            state, stored = dict(state, format=STATE_FORMAT, setup=setup), setup
        elif all(old.get(k) == setup.get(k) for k in set(old) | set(setup) if k not in NEW_SETTINGS):
            raise SweepError(f"{path} holds a sweep from before seeds_per_individual and the final round (state "
                             f"format 1): continue it with hydra.sweeper.seeds_per_individual=1 "
                             f"hydra.sweeper.final_candidates=0, or give a new hydra.sweep.dir")
        else:
            stored = old
    if state.get("format") not in (1, STATE_FORMAT) or stored != setup:
        if isinstance(stored, dict) and "format" in state:
            differ = sorted(k for k in set(setup) | set(stored) if stored.get(k) != setup.get(k)) or ["format"]
            raise SweepError(f"{path} holds a GA sweep with other settings ({', '.join(differ)}); continue it with "
                             f"the same command, or give a new hydra.sweep.dir")
        raise SweepError(f"{path} is damaged (no format and setup of a GA sweep): {aside}")
    problem = state_problem(state, setup)
    if problem:
        raise SweepError(f"{path} is damaged ({problem}): {aside}")
    return state


def state_problem(state: dict, setup: dict) -> Optional[str]:
    """What in a state (whose setup matches) a resumed sweep could not use; None if nothing."""
    dims, population, plan = len(setup["search_space"]), setup["population"], setup["plan"]

    def numbers(value, length, nullable=False):
        return isinstance(value, list) and len(value) == length and all(
            (v is None and nullable) or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value)

    def rows(value):
        return isinstance(value, list) and len(value) == population and all(numbers(r, dims) for r in value)

    ks = setup.get("seeds_per_individual") or [1] * len(plan)
    if not numbers(state.get("mean"), dims):
        return f"mean is not a list of {dims} numbers"
    jobs = state.get("jobs_launched")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
        return "jobs_launched is not a non-negative integer"
    generations = state.get("generations")
    if not isinstance(generations, list) or len(generations) > len(plan):
        return f"generations is not a list of at most {len(plan)} records"
    for g, record in enumerate(generations):
        if not isinstance(record, dict) or record.get("generation") != g:
            return f"generations[{g}] is not the record of generation {g}"
        if not (numbers(record.get("mean"), dims) and rows(record.get("z")) and rows(record.get("values"))
                and numbers(record.get("scores"), population, nullable=True)
                and numbers(record.get("seeds"), population * ks[g])):
            return (f"generations[{g}] lacks its mean, z, values, scores or seeds for {population} individuals "
                    f"and {dims} hyperparameters")
    final = state.get("final")
    if final is not None:
        z = final.get("z") if isinstance(final, dict) else None
        size = len(z) if isinstance(z, list) else 0
        origins = final.get("origins") if size else None

        def origin_ok(o):
            return o is None or (isinstance(o, list) and len(o) == 2 and all(type(v) is int for v in o)
                                 and 0 <= o[0] < len(generations) and 0 <= o[1] < population)

        if not (len(generations) == len(plan) and setup.get("final_candidates") and size
                and all(numbers(r, dims) for r in z) and numbers(final.get("scores"), size, nullable=True)
                and isinstance(origins, list) and len(origins) == size and all(origin_ok(o) for o in origins)
                and type(final.get("choice")) is int and 0 <= final["choice"] < size
                and type(final.get("seeds_per_individual")) is int and type(final.get("steps")) is int):
            return "final is not the record of a final round after the last generation"
    return None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _fmt(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else "failed"


def _seed_count(ks) -> str:
    """``2 seeds``, or ``1/1/2 seeds (per generation)`` where the generations differ."""
    if len(set(ks)) == 1:
        return f"{ks[0]} seed" + ("s" if ks[0] > 1 else "")
    return f"{'/'.join(map(str, ks))} seeds (per generation)"


def _score(value) -> float:
    return math.inf if value is None else float(value)


def _count(value, zero: bool = False) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= (0 if zero else 1)


def _first(setting, default):
    return default if setting is None else setting


def _origin(origin, generations) -> str:
    """A final-round candidate in words: the final mean, or gen g's individual i and its score there."""
    if origin is None:
        return "the final mean"
    g, i = origin
    return f"gen {g}'s individual {i} (scored {_fmt(_score(generations[g]['scores'][i]))} there)"


def _yaml_number(value: float, kind: str) -> str:
    """Six significant digits; for a decay, of 1 − x (0.9999723 keeps its meaningful digits)."""
    if kind == "decay" and 0 < value < 1:
        digits = max(0, 6 - int(math.floor(math.log10(1 - value))) - 1)
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
        return text if "." in text else text + ".0"
    mantissa, _, exponent = f"{value:.6g}".partition("e")
    if "." not in mantissa:
        mantissa += ".0"  # YAML 1.1 (PyYAML) reads 1e-05 as a string, 1.0e-05 as a float
    return mantissa + (f"e{exponent}" if exponent else "")
