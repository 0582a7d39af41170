"""The genetic tuner (SPEC §4.1): transforms, sampling, selection and scores on analytic problems, and the Hydra sweeper
end to end (a sweep stopped after generation 2 continues at generation 3 with the uninterrupted sweep's result)."""

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pytest import approx
import yaml
from omegaconf import OmegaConf

from hydra_plugins.lodo_ga_sweeper.ga_sweeper import GASweeper, SweepError, load_state
from lodo.experiment import genetic, registry

ROOT = Path(__file__).resolve().parent.parent
GA_CONFIG = yaml.safe_load((ROOT / "configs" / "hydra" / "sweeper" / "ga.yaml").read_text())


def schedule(name):
    entry = GA_CONFIG["schedules"][name]
    k = entry.get("seeds_per_individual", 1)
    return genetic.Schedule(name, tuple(entry["std"]), tuple(entry["steps"]), entry["population"],
                            entry.get("halve_rates_after", False), tuple(k) if isinstance(k, list) else k,
                            entry.get("final_candidates", 0), entry.get("final_seeds", 1))


def test_transforms_round_trip_and_decays_stay_in_the_unit_interval():
    for x in [1e-8, 0.00096, 0.27, 1.0, 23002.0]:
        assert genetic.to_search(x, "rate") == pytest.approx(math.log(x), rel=1e-15)
        assert genetic.from_search(genetic.to_search(x, "rate"), "rate") == pytest.approx(x, rel=1e-14)
    for x in [0.0, 0.195, 0.9, 0.9999723, 1 - 1e-12]:
        assert genetic.to_search(x, "decay") == pytest.approx(math.log(1 - x), rel=1e-12)
        assert genetic.from_search(genetic.to_search(x, "decay"), "decay") == pytest.approx(x, rel=1e-15, abs=1e-15)
    z = np.random.default_rng(0).normal(0, 30, 2000)
    decays = np.array([genetic.from_search(v, "decay") for v in z])
    assert (decays >= 0).all() and (decays < 1).all() and not np.signbit(decays).any()
    assert genetic.from_search(5.0, "decay") == 0.0 and genetic.from_search(-1e9, "decay") < 1.0
    for bad, kind in [(0.0, "rate"), (-1.0, "rate"), (1.0, "decay"), (-0.1, "decay")]:
        with pytest.raises(ValueError, match="cannot be tuned"):
            genetic.to_search(bad, kind, "x")
    with pytest.raises(ValueError, match="unknown kind 'log'"):
        genetic.check_kind("beta", "log")


def test_individuals_follow_the_schedule_std_and_are_reproducible():
    plan = schedule("bowl").plan()
    assert [s for s, _ in plan] == [3, 3, 3, 3, 2, 1.7, 1.4, 1.2, 0.9, 0.6]
    mean = [0.5, -2.0]
    for g, (std, _) in enumerate(plan):
        z = genetic.individuals(mean, std, 4000, seed=7, generation=g, kinds=["rate", "rate"])
        assert z.shape == (4000, 2)
        np.testing.assert_allclose(z.mean(axis=0), mean, atol=4 * std / np.sqrt(4000))
        np.testing.assert_allclose(z.std(axis=0), std, rtol=0.05)
    again = genetic.individuals(mean, 3.0, 8, seed=7, generation=2, kinds=["rate", "decay"])
    np.testing.assert_array_equal(again, genetic.individuals(mean, 3.0, 8, seed=7, generation=2, kinds=["rate", "decay"]))
    assert not np.array_equal(again, genetic.individuals(mean, 3.0, 8, seed=7, generation=3, kinds=["rate", "decay"]))
    assert (again[:, 1] <= 0).all()  # decays are clipped into the valid range of log(1 − x)


def test_ga_mean_moves_to_the_optimum_of_a_2d_quadratic():
    optimum = np.array([4.0, -3.0])
    curvature = np.array([1.0, 5.0])

    def score(z, steps, seeds):
        assert len(seeds) == len(set(seeds)) == len(z)
        return ((z - optimum) ** 2 * curvature).sum(axis=1)

    plan = schedule("bowl").plan()
    records = genetic.minimize(score, [0.0, 0.0], ["rate", "rate"], plan, population=32, seed=1)
    distances = [np.linalg.norm(r["mean"] - optimum) for r in records]
    assert len(records) == len(plan) + 1 and [r["std"] for r in records[:-1]] == [s for s, _ in plan]
    assert distances[-1] < 0.1 * distances[0]  # 5.0 → below 0.5
    assert distances[-1] < 0.5
    # The better half's mean beats the generation's mean score once the noise has shrunk.
    assert np.mean(records[-2]["scores"]) > score(records[-1]["mean"][None], 0, [0])[0]


def test_failures_rank_worst_and_the_better_half_sets_the_mean():
    z = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])
    scores = [5.0, float("nan"), 1.0, float("inf"), 2.0, 9.0]
    assert genetic.ranking(scores).tolist() == [2, 4, 0, 5, 1, 3]
    np.testing.assert_allclose(genetic.better_half_mean(z, scores), [(2 + 4 + 0) / 3])
    assert genetic.better_half_mean(z[:1], [float("nan")]).tolist() == [0.0]


def test_window_score_is_the_mean_of_the_last_tenth_of_the_steps():
    rng = np.random.default_rng(3)
    per_step = rng.uniform(1, 2, 1000)
    for log_every in (1, 10, 100, 7):
        ends = np.unique(np.append(np.arange(log_every, 1001, log_every), 1000))
        starts = np.concatenate([[0], ends[:-1]])
        rows = [per_step[a:b].mean() for a, b in zip(starts, ends)]
        expected = per_step[900:].mean() if 100 % log_every == 0 else None
        got = genetic.window_score(ends, rows, 1000, 0.1)
        if expected is not None:
            assert got == pytest.approx(expected, rel=1e-12)
        else:  # rows straddling the window start are weighted by their overlap
            weights = np.clip(np.minimum(ends, 1000) - np.maximum(starts, 900), 0, None)
            assert got == pytest.approx((weights * rows).sum() / 100, rel=1e-12)
    assert genetic.window_score([100, 200], [1.0, float("nan")], 200, 0.1) == math.inf
    assert genetic.window_score([100, 150], [1.0, 1.0], 200, 0.1) == math.inf  # stopped before the window
    assert genetic.window_score([], [], 200, 0.1) == math.inf
    assert genetic.window_length(200, 0.1) == 20 and genetic.window_length(5, 0.1) == 1


def test_schedules_shorten_and_extend_and_the_image_schedule_halves_rates():
    bowl = schedule("bowl")
    assert bowl.plan(generations=4, steps=20) == [(3.0, 20)] * 4
    assert bowl.plan(generations=12)[-3:] == [(0.6, 8000)] * 3
    assert schedule("rosenbrock").plan()[3] == (2.5, 200)
    assert schedule("resnet18").population == 16 and schedule("resnet18").plan()[-1] == (0.6, 500)
    assert schedule("image_generation").halve_rates_after and not bowl.halve_rates_after
    with pytest.raises(ValueError, match="one entry per generation"):
        genetic.Schedule("bad", (1.0, 2.0), (10,), 4)
    declared = {registry.task(name).ga_schedule for name in registry.names("task")} - {None}
    assert declared and declared <= set(GA_CONFIG["schedules"])  # each task's YAML names a schedule that exists
    assert genetic.summary_line(3, 10, [1.0, 3.0, float("nan")]) == "gen 3/10: mean 2 best 1 std 1 (1 failed)"


def ga(sweep_dir, *extra):
    """The real CLI: a tiny schedule (3 generations x 4 individuals x 20 steps) of Adam on Rosenbrock, with the
    schedule's 2 seeds per individual and final round (the final mean and the best 5 on 8 seeds each)."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    command = [sys.executable, "-m", "lodo.run", "-m", "hydra/sweeper=ga", "task=rosenbrock", "optimizer=adam",
               "hydra.sweeper.population=4", "hydra.sweeper.generations=3", "hydra.sweeper.steps=20",
               f"hydra.sweep.dir={sweep_dir}", *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.long
def test_sweep_stopped_after_two_generations_resumes_with_the_same_result(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    with ThreadPoolExecutor(max_workers=2) as pool:  # independent sweeps: side by side
        done, first = pool.map(lambda args: ga(*args), [(whole,), (split, "hydra.sweeper.stop_after=2")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((split / "ga_state.json").read_text())
    assert [g["generation"] for g in state["generations"]] == [0, 1] and not (split / "tuned.yaml").exists()
    second = ga(split)
    assert second.returncode == 0, second.stderr[-3000:]

    a, b = (json.loads((d / "ga_state.json").read_text()) for d in (whole, split))
    assert len(a["generations"]) == len(b["generations"]) == 3
    for ga_, gb in zip(a["generations"], b["generations"]):
        for key in ("z", "values", "seeds", "scores", "mean"):
            assert ga_[key] == gb[key], key
    assert a["mean"] == b["mean"]
    tuned = [yaml.safe_load((d / "tuned.yaml").read_text()) for d in (whole, split)]
    assert tuned[0] == tuned[1] and set(tuned[0]) == {"learning_rate", "beta_1", "beta_2"}
    assert (whole / "tuned.yaml").read_text().startswith("# @package optimizer\n# Tuned by this project's genetic")
    log = (split / "ga.log").read_text()
    assert "resuming at generation 2/3" in log and log.count("gen 2/3: mean") == 1 and "gen 1/3: mean" in log
    for name in ("tuning.png", "tuning.pdf"):
        assert (whole / name).stat().st_size > 1000
    # One job per generation ran all 4 individuals on 2 seeds each (the Rosenbrock schedule's), then one job the
    # final round's 6 candidates on 8 seeds each, all seeds distinct and none of the reported seeds 0-7.
    seeds = [s for g in a["generations"] for s in g["seeds"]] + a["final"]["seeds"]
    assert len(set(seeds)) == len(seeds) == 3 * 4 * 2 + 6 * 8 and min(seeds) == 1000
    summary = json.loads((whole / "gen_01" / "summary.json").read_text())
    assert summary["seeds"] == a["generations"][1]["seeds"]
    assert summary["hyperparameters"]["learning_rate"] == [v[0] for v in a["generations"][1]["values"] for _ in "kk"]
    assert a["generations"][1]["scores"] == pytest.approx(
        np.mean(np.reshape(a["generations"][1]["seed_scores"], (4, 2)), axis=1).tolist(), rel=1e-12)
    final = a["final"]
    for key in ("z", "values", "origins", "seeds", "seed_scores", "scores", "choice"):
        assert final[key] == b["final"][key], key
    assert final["origins"][0] is None and final["z"][0] == a["mean"]
    assert final["scores"][final["choice"]] == min(final["scores"])
    chosen = dict(zip(["learning_rate", "beta_1", "beta_2"], final["values"][final["choice"]]))
    assert tuned[0] == pytest.approx(chosen, rel=1e-6)
    assert "the best of a final round" in (whole / "tuned.yaml").read_text()
    assert "final round" in (whole / "ga.log").read_text()
    # Interrupted between the last generation and the final round: the same command runs just the round.
    state = json.loads((whole / "ga_state.json").read_text())
    del state["final"]
    (whole / "ga_state.json").write_text(json.dumps(state))
    again = ga(whole)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at the final selection round" in (whole / "ga.log").read_text()
    assert json.loads((whole / "ga_state.json").read_text())["final"]["scores"] == final["scores"]
    assert yaml.safe_load((whole / "tuned.yaml").read_text()) == tuned[0]

    setup = dict(a["setup"], seed=1)  # a different sweep in the same folder is refused
    with pytest.raises(SweepError, match=r"holds a GA sweep with other settings \(seed\)"):
        load_state(whole / "ga_state.json", setup)
    assert load_state(tmp_path / "none.json", setup) is None


def test_install_never_silently_replaces_a_tuned_file(tmp_path):
    (tmp_path / "tuned" / "rosenbrock").mkdir(parents=True)
    (tmp_path / "tuned" / "rosenbrock" / "adam.yaml").write_text("# the paper's values\n")
    sources = {"hydra": {"runtime": {"config_sources": [{"provider": "main", "schema": "file", "path": str(tmp_path)}]}}}
    for install, error in [(True, "exists"), ("overwrite", None), (False, None)]:
        sweeper = GASweeper(install=install)
        sweeper.config = OmegaConf.create(sources)
        if error:
            with pytest.raises(SweepError, match=r"adam.yaml exists .* hydra.sweeper.install=overwrite replaces it"):
                sweeper._install_target("rosenbrock", "adam")
        else:
            target = sweeper._install_target("rosenbrock", "adam")
            assert target == (tmp_path / "tuned" / "rosenbrock" / "adam.yaml" if install else None)
    sweeper = GASweeper(install=True)
    sweeper.config = OmegaConf.create(sources)
    assert sweeper._install_target("rosenbrock", "lodo") == tmp_path / "tuned" / "rosenbrock" / "lodo.yaml"
    sweeper = GASweeper(install="overwrite")  # a search over part of the tune: block would drop the rest
    sweeper.config = OmegaConf.create(sources)
    with pytest.raises(SweepError, match=r"leaves out beta_1, beta_2, so installing .* would drop their values"):
        sweeper._install_target("rosenbrock", "adam", ("beta_1", "beta_2"))


def test_a_generation_is_one_job_on_small_tasks_and_one_job_per_individual_on_image_tasks(tmp_path):
    sweeper = GASweeper(job_overrides=["progress=false"])
    values, seeds = [[0.5, 0.9], [1e-05, 0.0]], [1008, 1009]
    overrides, folder = sweeper._job(2, 1500, ["learning_rate", "momentum"], values, seeds, 0, 2, False, False,
                                     ["task=rosenbrock"], tmp_path)
    assert folder == tmp_path / "gen_02"
    assert overrides[:4] == ["task=rosenbrock", "steps=1500", "log_every=150", "progress=false"]
    assert {"seed=1008", "num_seeds=2", "optimizer.learning_rate=[0.5,1e-05]", "optimizer.momentum=[0.9,0.0]",
            "chunk_size=1500",
            "hydra.sweep.subdir=gen_02", f"hydra.sweep.dir='{tmp_path}'"} <= set(overrides)
    overrides, folder = sweeper._job(0, 1000, ["learning_rate", "momentum"], values, seeds, 1, 2, True, True, [],
                                     tmp_path)
    assert folder == tmp_path / "gen_00" / "ind_01"
    assert {"seed=1009", "num_seeds=1", "optimizer.learning_rate=1e-05", "optimizer.momentum=0.0"} <= set(overrides)


class FakeLauncher:
    """Runs no training: a job 'crashes' if it holds a bad seed, else writes curve.csv with loss = seed."""

    def __init__(self, bad_seeds):
        self.bad, self.batches = set(bad_seeds), []

    def launch(self, batch, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        self.batches.append([dict(o.split("=", 1) for o in overrides) for overrides in batch])
        returns = []
        for job in self.batches[-1]:
            seeds = range(int(job["seed"]), int(job["seed"]) + int(job["num_seeds"]))
            if self.bad & set(seeds):
                returns.append(JobReturn(status=JobStatus.FAILED, _return_value=ValueError("boom")))
                continue
            folder = Path(job["hydra.sweep.dir"].strip("'")) / job["hydra.sweep.subdir"]
            folder.mkdir(parents=True)
            steps = int(job["steps"])
            rows = "".join(f"{s},{step},0.0,{s}.0\n" for s in seeds for step in (steps // 2, steps))
            (folder / "curve.csv").write_text("seed,step,train_time_s,loss\n" + rows)
            returns.append(JobReturn(status=JobStatus.COMPLETED, _return_value={}))
        return returns


def test_a_crashed_generation_job_is_split_until_the_failing_individuals_are_found(tmp_path):
    sweeper = GASweeper()
    sweeper.launcher = FakeLauncher(bad_seeds={105})
    sweeper.validate_batch_is_legal = lambda batch: None
    seeds = list(range(100, 108))
    values = [[0.1 * (i + 1)] for i in range(8)]
    state = {"jobs_launched": 3}
    scores, seed_scores, walls, folders, _ = sweeper._run_generation(0, 10, ["learning_rate"], values, seeds, False,
                                                                    False, [], tmp_path, state)
    assert scores == seed_scores == [100, 101, 102, 103, 104, math.inf, 106, 107]
    assert [len(b) for b in sweeper.launcher.batches] == [1, 2, 2, 2] and state["jobs_launched"] == 3 + 7
    assert len(walls) == 4
    assert [f.relative_to(tmp_path).as_posix() for f in folders] == [
        "gen_00", "gen_00/ind_00-03", "gen_00/ind_04-07", "gen_00/ind_04-05", "gen_00/ind_06-07", "gen_00/ind_04",
        "gen_00/ind_05"]
    assert sweeper.launcher.batches[2][1]["optimizer.learning_rate"] == "[0.7000000000000001,0.8]"


def test_result_is_the_final_mean_with_learning_rates_halved_on_request(tmp_path):
    keys, kinds = ["initial_lr", "meta_lr", "beta"], ["rate", "rate", "decay"]
    final = [math.log(0.08459), math.log(7.946e-6), math.log(1 - 0.9343)]
    z = [[math.log(0.1), math.log(1e-5), math.log(0.1)], [math.log(0.05), math.log(1e-6), math.log(0.05)]]
    state = {"setup": {"plan": [[3.0, 1000]], "population": 2, "center": [0.27, 0.00096, 0.195], "task": "t",
                       "optimizer": "lodo"},
             "generations": [{"generation": 0, "mean": final, "z": z, "scores": [0.7, None],
                              "values": [[genetic.from_search(v, k) for v, k in zip(row, kinds)] for row in z]}],
             "mean": final}
    sweeper = GASweeper(export_dir=str(tmp_path / "export"))
    schedule = genetic.Schedule("image_generation", (3.0,), (1000,), 2, halve_rates_after=True)
    tuned = sweeper._finish(state, keys, kinds, schedule, True, "pixelcnn_mnist", "lodo", tmp_path, None)
    assert tuned == pytest.approx({"initial_lr": 0.08459 / 2, "meta_lr": 7.946e-6, "beta": 0.9343}, rel=1e-12)
    text = (tmp_path / "tuned.yaml").read_text()
    assert yaml.safe_load(text) == pytest.approx({"initial_lr": 0.042295, "meta_lr": 7.946e-6, "beta": 0.9343})
    assert "initial_lr halved after tuning" in text and "better half 0.7, best 0.7" in text
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["tuned.yaml", "tuning.pdf", "tuning.png"]


def test_curve_rows_that_lost_their_digits_after_a_transient_are_not_scored():
    # The runner's rows are differences of running sums: after a transient of 1e27 the small losses vanish.
    per_step = np.concatenate([np.full(100, 10.0), np.full(100, 1e27), np.full(800, 15.0)])
    sums = np.concatenate([[0.0], np.cumsum(per_step)])
    ends = np.arange(100, 1001, 100)
    rows = (sums[ends] - sums[ends - 100]) / 100
    assert rows[-1] == 0.0  # what curve.csv then holds
    assert genetic.window_score(ends, rows, 1000, 0.1) is None
    calm = np.concatenate([np.full(200, 10.0), np.full(800, 15.0)])
    sums = np.concatenate([[0.0], np.cumsum(calm)])
    assert genetic.window_score(ends, (sums[ends] - sums[ends - 100]) / 100, 1000, 0.1) == pytest.approx(15.0)


def test_the_tuning_summary_compares_the_small_tasks_and_leaves_image_sweeps_out(tmp_path):
    """Image sweeps fill values the paper lost, and the newer optimizers (AdamW) have none in it, so there is no
    paper's value to put beside them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tuning_summary", ROOT / "scripts" / "tuning_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    for task, optimizer in (("pixelcnn_mnist", "rmsprop"), ("rosenbrock", "adam"), ("rosenbrock", "adamw")):
        (tmp_path / task / optimizer).mkdir(parents=True)
        (tmp_path / task / optimizer / "ga_state.json").write_text(json.dumps(
            {"setup": {"plan": [[3, 200], [2, 200]]}, "generations": [{"wall_s": 1.0, "seeds": [1000]}]}))
    frame, problems = summary.collect(tmp_path)
    assert frame.empty and problems == ["rosenbrock/adam: sweep unfinished (1/2 generations)"]


# --- several seeds per individual and the final selection round ------------------------------------------------


def test_seed_layout_is_consecutive_blocks_and_the_final_round_seeds_are_fresh():
    ks = genetic.per_generation([1, 2, 3], 5)
    assert ks == [1, 2, 3, 3, 3] and genetic.per_generation(2, 3) == [2, 2, 2]
    assert genetic.per_generation([1, 2, 3], 2) == [1, 2]
    blocks = [genetic.generation_seeds(1000, 4, ks, g) for g in range(5)]
    assert [len(b) for b in blocks] == [4 * k for k in ks]
    final = genetic.final_round_seeds(1000, 4, ks, 3, 5)
    every = [s for b in blocks for s in b] + final
    assert every == list(range(1000, 1000 + 4 * sum(ks) + 15))  # consecutive, distinct, all from first_seed up
    assert blocks[1] == list(range(1004, 1012))  # individual i of generation 1: seeds 1004 + 2i, 1005 + 2i
    for bad in (0, [1, 0], [], 1.5, True):
        with pytest.raises(ValueError, match="seeds_per_individual must be a positive integer"):
            genetic.per_generation(bad, 3)
    assert schedule("bowl").seeds() == GA_CONFIG["schedules"]["bowl"]["seeds_per_individual"]
    assert schedule("bowl").seeds(12)[-1] == 2 and schedule("resnet18").seeds() == [1] * 10
    for field, value, words in [("seeds_per_individual", (1, 0), "seeds_per_individual"),
                                ("final_candidates", -1, "final_candidates must be an integer >= 0"),
                                ("final_seeds", 0, "final_seeds must be a positive integer"),
                                ("final_steps", "last", "final_steps must be a positive integer, 'task' or null")]:
        with pytest.raises(ValueError, match=words):
            genetic.Schedule("bad", (1.0,), (10,), 4, **{field: value})


def test_an_individual_scores_the_mean_of_its_seeds_and_worst_if_any_seed_failed():
    per_seed = [1.0, 3.0, 2.0, float("nan"), 5.0, 7.0, float("inf"), 1.0]
    np.testing.assert_array_equal(genetic.individual_scores(per_seed, 2), [2.0, np.inf, 6.0, np.inf])
    np.testing.assert_array_equal(genetic.individual_scores(per_seed, 1), np.where(np.isfinite(per_seed), per_seed,
                                                                                   np.inf))
    # Two finite seeds whose mean overflows float64 also score worst, without a warning.
    assert genetic.individual_scores([1e308, 1e308], 2).tolist() == [math.inf]


def test_with_k_seeds_each_individual_trains_k_seeds_of_its_own_and_averaging_removes_their_noise():
    """Seeds in pairs with opposite noise: with 2 seeds per individual the GA sees the noise-free score exactly,
    so it follows the noise-free GA's path; with 1 seed the noise changes its ranking."""
    optimum, noise = np.array([1.5, -2.0]), 40.0
    plan = schedule("bowl").plan()

    def clean(z, steps, seeds):
        return ((z - optimum) ** 2).sum(axis=1)

    def noisy(z, steps, seeds):
        seeds = np.asarray(seeds)
        assert len(seeds) == len(z) and len(set(seeds.tolist())) == len(seeds) and seeds.min() >= 1000
        return clean(z, steps, seeds) + noise * np.where(seeds % 2, -1.0, 1.0)

    twice = genetic.minimize(noisy, [0.0, 0.0], ["rate", "rate"], plan, 32, seed=4, seeds_per_individual=2,
                             first_seed=1000)
    exact = genetic.minimize(clean, [0.0, 0.0], ["rate", "rate"], plan, 32, seed=4)
    once = genetic.minimize(noisy, [0.0, 0.0], ["rate", "rate"], plan, 32, seed=4, first_seed=1000)
    for a, b in zip(twice[:-1], exact[:-1]):
        np.testing.assert_allclose(a["z"], b["z"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-12)
        assert len(a["seeds"]) == 64 and len(a["seed_scores"]) == 64
    np.testing.assert_allclose(twice[-1]["mean"], exact[-1]["mean"], atol=1e-9)
    assert not np.allclose(once[-1]["mean"], exact[-1]["mean"], atol=1e-3)
    assert np.linalg.norm(exact[-1]["mean"] - optimum) < 0.3  # and the noise-free GA finds the optimum


def test_candidates_are_the_final_mean_then_the_best_individuals_of_the_final_step_count():
    gens = [{"generation": 0, "steps": 200, "z": [[0.0], [1.0], [2.0]], "scores": [0.5, 0.1, math.inf]},
            {"generation": 1, "steps": 800, "z": [[3.0], [4.0], [5.0]], "scores": [0.9, None, 0.7]},
            {"generation": 2, "steps": 800, "z": [[6.0], [5.0], [7.0]], "scores": [0.8, 0.7, 0.2]}]
    z, origins = genetic.candidates(gens, [9.0], 3)
    # Generation 0 ran fewer steps: not comparable. Ties go to the later generation; a duplicate is dropped.
    assert z.tolist() == [[9.0], [7.0], [5.0], [6.0]] and origins == [None, (2, 2), (2, 1), (2, 0)]
    z, origins = genetic.candidates(gens, [7.0], 10)  # the final mean equal to an individual: once
    assert z.tolist() == [[7.0], [5.0], [6.0], [3.0]] and origins == [None, (2, 1), (2, 0), (1, 0)]
    assert genetic.candidates(gens, [9.0], 0)[1] == [None]


def test_the_final_round_picks_the_best_candidate_where_the_final_mean_lags_behind_a_stability_edge():
    """Loss falls towards an edge (log lr = 0) beyond which every run diverges, as a learning rate's does: the
    better half's centroid stays well inside, and re-scoring the best individuals finds one near the edge."""
    plan = schedule("bowl").plan()
    true = lambda x: 1.0 - 0.9 * np.exp(np.minimum(x, 0.0))  # noqa: E731  (the score without seed noise)

    def score(z, steps, seeds):
        noise = np.array([np.random.default_rng([int(s), 7]).standard_normal() for s in seeds])
        return np.where(z[:, 0] < 0, true(z[:, 0]) + 0.01 * noise, np.inf)

    for ga_seed in range(3):
        records = genetic.minimize(score, [-3.0], ["rate"], plan, 32, seed=ga_seed, first_seed=1000,
                                   final_candidates=5, final_seeds=4)
        final = records[-1]
        assert final["origins"][0] is None and len(final["candidates"]) == 6
        assert [o[0] for o in final["origins"][1:]] == [9] * 5  # only the last generation ran 8000 steps
        assert final["choice"] == int(np.argmin(final["scores"])) != 0
        np.testing.assert_array_equal(final["result"], final["candidates"][final["choice"]])
        assert final["result"][0] - final["mean"][0] > 0.2  # nearer the edge than the centroid
        assert true(final["result"][0]) < true(final["mean"][0]) - 0.1
        seen = {s for r in records[:-1] for s in r["seeds"].tolist()}
        assert not seen & set(final["seeds"].tolist()) and len(final["seeds"]) == 24
    plain = genetic.minimize(score, [-3.0], ["rate"], plan, 32, seed=0, first_seed=1000)
    np.testing.assert_array_equal(plain[-1]["result"], plain[-1]["mean"])  # final_candidates=0: the paper's


def test_a_generation_of_k_seeds_per_individual_is_one_job_with_each_value_k_times(tmp_path):
    sweeper = GASweeper()
    values, seeds = [[0.5, 0.9], [1e-05, 0.0]], [1010, 1011, 1012, 1013, 1014, 1015]
    overrides, folder = sweeper._job(1, 200, ["learning_rate", "momentum"], values, seeds, 0, 2, False, False, [],
                                     tmp_path)
    assert folder == tmp_path / "gen_01"
    assert {"seed=1010", "num_seeds=6", "optimizer.learning_rate=[0.5,0.5,0.5,1e-05,1e-05,1e-05]",
            "optimizer.momentum=[0.9,0.9,0.9,0.0,0.0,0.0]"} <= set(overrides)
    overrides, folder = sweeper._job(1, 200, ["learning_rate", "momentum"], values, seeds, 1, 2, False, False, [],
                                     tmp_path)
    assert folder == tmp_path / "gen_01" / "ind_01" and {"seed=1013", "num_seeds=3"} <= set(overrides)
    overrides, folder = sweeper._job("final", 200, ["learning_rate", "momentum"], values, seeds, 1, 2, False, True,
                                     [], tmp_path)  # one job per individual: its k seeds share scalar values
    assert folder == tmp_path / "final" / "ind_01"
    assert {"seed=1013", "num_seeds=3", "optimizer.learning_rate=1e-05", "optimizer.momentum=0.0"} <= set(overrides)


def test_a_failed_seed_makes_its_individual_worst_and_a_crash_is_pinned_on_the_individual(tmp_path):
    sweeper = GASweeper()
    sweeper.launcher = FakeLauncher(bad_seeds={105})
    sweeper.validate_batch_is_legal = lambda batch: None
    seeds, values = list(range(100, 108)), [[0.1], [0.2], [0.3], [0.4]]  # 2 seeds each
    state = {"jobs_launched": 0}
    scores, seed_scores, _, folders, _ = sweeper._run_generation(3, 10, ["learning_rate"], values, seeds, False, False,
                                                                 [], tmp_path, state)
    assert seed_scores == [100, 101, 102, 103, math.inf, math.inf, 106, 107]  # 104 shared the crashed job of 105
    assert scores == [100.5, 102.5, math.inf, 106.5]
    assert [f.relative_to(tmp_path).as_posix() for f in folders] == [
        "gen_03", "gen_03/ind_00-01", "gen_03/ind_02-03", "gen_03/ind_02", "gen_03/ind_03"]
    assert sweeper.launcher.batches[1][1]["optimizer.learning_rate"] == "[0.3,0.3,0.4,0.4]"


def final_round_state(tmp_path, population=4, k=2):
    """A finished 2-generation state without its final round: individual i of generation g scores 0.5 − 0.01i − 0.1g
    (individual 1 failed) and has the learning rate 0.01·(1 + i + g·population)."""
    kinds = ["rate"]
    setup = {"task": "rosenbrock", "optimizer": "adam", "search_space": {"learning_rate": "rate"}, "center": [0.1],
             "population": population, "plan": [[3.0, 10], [2.0, 10]], "seeds_per_individual": [k, k],
             "final_candidates": 2, "final_seeds": 3, "final_steps": 10}
    generations = []
    for g in range(2):
        z = [[math.log(0.01 * (1 + i + g * population))] for i in range(population)]
        generations.append({"generation": g, "steps": 10, "z": z, "mean": [0.0],
                            "values": [[genetic.from_search(r[0], "rate")] for r in z],
                            "seeds": genetic.generation_seeds(1000, population, [k, k], g),
                            "scores": [0.5 - 0.01 * i - 0.1 * g if i != 1 else None for i in range(population)],
                            "wall_s": 1.0})
    return {"format": 2, "setup": setup, "generations": generations, "mean": [math.log(0.5)], "jobs_launched": 2}


def test_the_final_round_rescores_the_candidates_on_fresh_seeds_and_the_result_is_its_best(tmp_path):
    from hydra_plugins.lodo_ga_sweeper import ga_sweeper

    state = final_round_state(tmp_path)
    sweeper = GASweeper(export_dir=str(tmp_path / "export"))
    sweeper.launcher = FakeLauncher(bad_seeds={1017})  # candidate 0 (the final mean), seeds 1016-1018: it fails
    sweeper.validate_batch_is_legal = lambda batch: None
    state_path = tmp_path / "ga_state.json"
    sweeper._final_round(state, ["learning_rate"], ["rate"], 2, 3, False, False, [], tmp_path, state_path)
    final = json.loads(state_path.read_text())["final"]
    # The candidates: the final mean, then generation 1's individuals 3 and 2 (0.37, 0.38; the best of both).
    assert final["origins"] == [None, [1, 3], [1, 2]]
    assert final["origin_scores"] == [None, approx(0.37), approx(0.38)]
    assert final["seeds"] == list(range(1016, 1025)) and final["seeds_per_individual"] == 3
    # FakeLauncher's loss is the seed: candidate c scores the mean of its 3 seeds; the first job crashed, so the
    # halves ran again and the final mean's seeds failed.
    assert final["scores"] == [None, 1020.0, 1023.0] and final["choice"] == 1
    assert final["jobs"] == ["final", "final/ind_00", "final/ind_01-02"]
    tuned = sweeper._finish(state, ["learning_rate"], ["rate"], genetic.Schedule("s", (3.0, 2.0), (10, 10), 4),
                            False, "rosenbrock", "adam", tmp_path, None)
    assert tuned == pytest.approx({"learning_rate": 0.08})  # generation 1's individual 3: 0.01·(1 + 3 + 4)
    text = (tmp_path / "tuned.yaml").read_text()
    assert "Values: gen 1's individual 3 (scored 0.37 there), the best of a final round" in text
    assert "(the final mean: failed)" in text and "x 2 seeds each" in text
    assert yaml.safe_load(text) == pytest.approx({"learning_rate": 0.08})
    log = (tmp_path / ga_sweeper.LOG_FILE).read_text()
    assert "the result is gen 1's individual 3 (scored 0.37 there), score 1020" in log
    assert "final round: the final mean: failed on seeds 1016-1018" in log
    assert load_state(state_path, state["setup"])["final"]["choice"] == 1  # a state with a final round resumes


def test_a_format_1_state_resumes_as_its_own_sweep_or_is_refused_in_one_line(tmp_path):
    from hydra_plugins.lodo_ga_sweeper.ga_sweeper import STATE_FORMAT

    state = final_round_state(tmp_path, k=1)
    old_setup = {k: v for k, v in state["setup"].items() if k not in ("seeds_per_individual", "final_candidates",
                                                                      "final_seeds", "final_steps")}
    path = tmp_path / "ga_state.json"
    path.write_text(json.dumps(dict(state, format=1, setup=old_setup)))
    as_before = dict(old_setup, seeds_per_individual=[1, 1], final_candidates=0, final_seeds=0, final_steps=0)
    loaded = load_state(path, as_before)
    assert loaded["format"] == STATE_FORMAT and loaded["setup"] == as_before
    assert loaded["generations"] == state["generations"]
    for setup in (state["setup"], dict(as_before, seeds_per_individual=[2, 2])):
        with pytest.raises(SweepError) as err:
            load_state(path, setup)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
        assert "state format 1" in str(err.value) and "hydra.sweeper.final_candidates=0" in str(err.value)
    with pytest.raises(SweepError, match=r"other settings \(final_candidates, final_seeds, final_steps, seed"):
        load_state(path, dict(state["setup"], seed=3))  # another sweep altogether: its differences are named
    # A state whose seeds do not match its seeds per individual, or with a broken final record, is damaged.
    bad = dict(state, setup=dict(state["setup"], seeds_per_individual=[2, 2]))
    path.write_text(json.dumps(bad))
    with pytest.raises(SweepError, match=r"generations\[0\] lacks"):
        load_state(path, bad["setup"])
    path.write_text(json.dumps(dict(state, final={"z": [[0.0]], "scores": [1.0], "origins": [None], "choice": 3})))
    with pytest.raises(SweepError, match="final is not the record of a final round"):
        load_state(path, state["setup"])


@pytest.mark.parametrize("setting, value, words", [
    ("seeds_per_individual", 0, "seeds_per_individual must be a positive integer, a list of them"),
    ("seeds_per_individual", [2, "x"], "seeds_per_individual must be a positive integer, a list of them"),
    ("final_candidates", -1, "final_candidates must be a non-negative integer or null"),
    ("final_seeds", 0, "final_seeds must be a positive integer or null"),
    ("final_steps", "all", "final_steps must be a positive integer, 'task' \\(the run's steps\\) or null"),
])
def test_bad_new_settings_are_refused_in_one_line(setting, value, words):
    with pytest.raises(SweepError, match=f"hydra.sweeper.{words}"):
        GASweeper(**{setting: value})._check_settings()


def test_the_schedules_settings_and_their_overrides():
    sweeper = GASweeper(schedules=GA_CONFIG["schedules"])
    bowl = sweeper._schedule("noisy_quadratic_bowl", "bowl")
    assert (bowl.seeds(), bowl.final_candidates, bowl.final_seeds, bowl.final_steps) == (
        [1, 1, 1, 1, 1, 1, 1, 2, 2, 2], 4, 2, "task")
    image = sweeper._schedule("pixelcnn_mnist", "image_generation")
    assert (image.seeds(), image.final_candidates) == ([1] * 10, 0)  # the image schedules: the paper's algorithm
    sweeper = GASweeper(schedules=GA_CONFIG["schedules"], seeds_per_individual=[3, 1], final_candidates=0)
    bowl = sweeper._schedule("noisy_quadratic_bowl", "bowl")
    assert (bowl.seeds(), bowl.final_candidates) == ([3] + [1] * 9, 0)


def test_the_tuning_summary_reports_the_final_rounds_pick_its_time_and_the_loss_ratio(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tuning_summary", ROOT / "scripts" / "tuning_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    sweep = tmp_path / "rosenbrock" / "momentum"
    sweep.mkdir(parents=True)
    generations = [{"wall_s": 10.0, "retry_wall_s": 0.0, "seeds": [1000 + 4 * g + i for i in range(4)]}
                   for g in range(2)]
    final = {"wall_s": 5.0, "seeds": list(range(1008, 1014)), "origins": [None, [1, 3], [0, 2]], "choice": 1,
             "steps": 800}
    (sweep / "ga_state.json").write_text(json.dumps({
        "setup": {"plan": [[3, 200], [2, 200]], "population": 2, "seeds_per_individual": [2, 2],
                  "final_candidates": 2, "final_seeds": 2, "search_space": {"learning_rate": "rate"},
                  "center": [0.01]}, "generations": generations, "final": final}))
    (sweep / "tuned.yaml").write_text("learning_rate: 0.05\n")
    for name, loss, lr in (("eval_ours", 1.0e-4, 0.05), ("eval_paper", 1.25e-4, 0.0987)):
        (sweep / name).mkdir()
        (sweep / name / "summary.json").write_text(json.dumps({
            "loss_final_mean": loss, "loss_final_std": 0.0, "diverged": 0, "seeds": list(range(8)), "steps": 200,
            "report_window": [180, 200], "hyperparameters": {"learning_rate": lr}}))
    frame, problems = summary.collect(tmp_path)
    assert problems == [] and len(frame) == 1
    row = frame.iloc[0]
    assert row["ratio"] == pytest.approx(0.8) and row["result"] == "gen 1, individual 3"
    assert row["tuning_s"] == 25.0 and row["tuning_seeds"] == "1000-1013" and row["seeds_per_individual"] == "2"
    text = summary.markdown(frame)
    assert "| gen 1, individual 3 |" in text and "| 0.800 ✓ | 0.4 min |" in text
    assert "2 generations x 2 individuals x 2 seeds each, then a final round" in text
    assert "re-scored on 2 fresh seeds each over 800 steps" in text


def test_the_final_round_can_train_longer_than_the_generations_and_ranks_by_that_horizon(tmp_path):
    """The best value after a short run differs from the best after the task's long run (as Yogi's on the bowl):
    a final round over the long run picks the candidate that is best there."""
    plan = [(1.0, 100)] * 4

    def score(z, steps, seeds):
        best = 0.0 if steps == 100 else 0.8  # the long run prefers a larger learning rate
        return (z[:, 0] - best) ** 2

    records = genetic.minimize(score, [0.0], ["rate"], plan, 16, seed=2, first_seed=1000, final_candidates=5,
                               final_steps=10_000)
    final = records[-1]
    assert final["steps"] == 10_000
    long = (final["candidates"][:, 0] - 0.8) ** 2
    assert final["choice"] == int(np.argmin(long)) and final["scores"].tolist() == pytest.approx(long.tolist())
    short = genetic.minimize(score, [0.0], ["rate"], plan, 16, seed=2, first_seed=1000, final_candidates=5)[-1]
    assert short["steps"] == 100 and short["choice"] == int(np.argmin(short["candidates"][:, 0] ** 2))
    assert final["result"][0] > short["result"][0]

    state = final_round_state(tmp_path)
    state["setup"]["final_steps"] = 50
    sweeper = GASweeper()
    sweeper.launcher = FakeLauncher(bad_seeds=set())
    sweeper.validate_batch_is_legal = lambda batch: None
    sweeper._final_round(state, ["learning_rate"], ["rate"], 2, 3, False, False, [], tmp_path, tmp_path / "s.json")
    job = sweeper.launcher.batches[0][0]
    assert (job["steps"], job["log_every"], job["chunk_size"]) == ("50", "5", "50") and state["final"]["steps"] == 50
    assert state["final"]["scores"] == [1017.0, 1020.0, 1023.0]  # scored over the longer run's window
