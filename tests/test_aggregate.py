"""``python -m lodo.experiment.aggregate``: any set of run folders into one table and figure, skipping unfinished ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from lodo.experiment import aggregate
from lodo.experiment import job
from lodo.experiment.registry import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def fake_run(folder: Path, summary: dict | str | None, curve: bool = True) -> Path:
    """A run folder as the runner leaves it (config.yaml, summary.json, curve.csv), without training."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")  # Hydra's copy: not a run folder
    if summary is not None:
        (folder / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    if curve and isinstance(summary, dict):
        steps = np.arange(10, summary["steps"] + 1, 10)
        rows = [(s, t, 1.0, 10.0 / t + s) for s in range(len(summary["seeds"])) for t in steps]
        pd.DataFrame(rows, columns=["seed", "step", "train_time_s", "loss"]).to_csv(folder / "curve.csv", index=False)
    return folder


def summary(optimizer, lr, losses, steps=100, task="noisy_quadratic_bowl", **extra):
    finite = [x for x in losses if x is not None]
    return {"task": task, "optimizer": optimizer, "hyperparameters": {"learning_rate": lr, "beta_1": 0.9},
            "task_options": {"dim": 10}, "steps": steps, "seeds": list(range(len(losses))),
            "loss_final_mean": float(np.mean(finite)), "loss_final_std": float(np.std(finite)),
            "loss_final_per_seed": losses, "diverged": losses.count(None), "train_time_s": 2.0,
            "seed_steps_per_s": len(losses) * steps / 2.0, "completed": True, **extra}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    fake_run(root / "sweep_a" / "adam_0.1", summary("adam", 0.1, [1.0, 3.0]))
    fake_run(root / "sweep_a" / "adam_0.01", summary("adam", 0.01, [5.0, 7.0, None]))
    fake_run(root / "deep" / "er" / "image", summary("adam", 0.001, [0.8, 0.9], task="pixelcnn_mnist",
                                                     test_loss=0.7, test_accuracy=0.25))
    fake_run(root / "sweep_a" / "crashed", None)
    fake_run(root / "sweep_a" / "stopped", summary("lodo", 0.1, [1.0], completed=False))
    fake_run(root / "broken", '{"task": "noisy_quad')
    return root


def test_table_skips_unfinished_runs_and_says_which(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert aggregate.main([str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"skipped {runs / 'sweep_a' / 'crashed'}: no summary.json (unfinished or crashed)" in err
    assert f"skipped {runs / 'sweep_a' / 'stopped'}: not completed" in err
    assert f"skipped {runs / 'broken'}: unreadable summary.json" in err
    assert err.count("skipped") == 3

    table = pd.read_csv(out / "aggregate.csv")
    assert list(table.folder) == ["sweep_a/adam_0.01", "sweep_a/adam_0.1", "deep/er/image"]  # by task, then optimizer
    bowl = table[table.task == "noisy_quadratic_bowl"].set_index("folder")
    assert bowl.loc["sweep_a/adam_0.1", "key_hyperparameters"] == "learning_rate=0.1"  # beta_1 is the same
    assert bowl.loc["sweep_a/adam_0.01", "loss_mean"] == pytest.approx(6.0)
    assert bowl.loc["sweep_a/adam_0.01", "diverged"] == 1 and bowl.loc["sweep_a/adam_0.01", "seeds"] == 3
    assert bowl.loc["sweep_a/adam_0.1", "steps_per_s"] == pytest.approx(50.0)  # 100 steps in 2 s
    image = table.set_index("folder").loc["deep/er/image"]
    assert (image.test_loss, image.test_accuracy) == (0.7, 0.25)

    md = (out / "aggregate.md").read_text()
    assert "| Test loss | Test accuracy |" in md
    assert "| noisy_quadratic_bowl | Adam | learning_rate=0.01 | 100 | 3 | 6 ± 1 (1/3 diverged) | 1 |" in md
    assert (out / "aggregate_curves.png").stat().st_size > 10_000 and (out / "aggregate_curves.pdf").exists()


@pytest.mark.slow
def test_a_real_run_folder_and_the_command_line(tmp_path):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["optimizer=adam", "task.dim=6", "steps=40", "num_seeds=2",
                                           "chunk_size=20", "progress=false"])
    stored = job.run(cfg, tmp_path / "multirun" / "adam")
    (tmp_path / "multirun" / "lodo").mkdir()
    (tmp_path / "multirun" / "lodo" / "config.yaml").write_text("seed: 0\n")  # started, never finished
    before = sorted(p for p in (tmp_path / "multirun").rglob("*"))
    result = subprocess.run([sys.executable, "-m", "lodo.experiment.aggregate", str(tmp_path / "multirun")], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped" in result.stderr and "multirun/lodo: no summary.json" in result.stderr
    table = pd.read_csv(tmp_path / "multirun" / "aggregate.csv")
    row = table.iloc[0]
    assert (row.optimizer, row.steps, row.seeds) == ("adam", 40, 2)
    assert row.loss_mean == pytest.approx(stored["loss_final_mean"], rel=1e-7)
    assert "| noisy_quadratic_bowl | Adam | – | 40 | 2 |" in result.stdout
    written = {p.name for p in (tmp_path / "multirun").rglob("*")} - {p.name for p in before}
    assert written == {"aggregate.csv", "aggregate.md", "aggregate_curves.png", "aggregate_curves.pdf"}


def test_nothing_to_aggregate_is_an_error(tmp_path, capsys):
    assert aggregate.main([str(tmp_path / "missing")]) == 2
    assert "error: " in capsys.readouterr().err
    fake_run(tmp_path / "only" / "crashed", None)
    assert aggregate.main([str(tmp_path / "only")]) == 2
    assert "error: no finished run folder" in capsys.readouterr().err


def test_jobs_that_differ_only_by_seed_pool_into_one_row(tmp_path):
    """A 2-optimizer x 3-seed sweep (-m optimizer=adam,lodo seed=0,1,2 num_seeds=1) gives 2 rows of 3 seeds."""
    root = tmp_path / "multirun"
    finals = {"adam": [4.0, 5.0, 9.0], "lodo": [1.0, 2.0, None]}
    for name, values in finals.items():
        for seed, value in enumerate(values):
            s = summary(name, 0.1, [value])
            s["seeds"] = [seed]
            fake_run(root / f"optimizer={name},seed={seed}", s)
    diverging = {**summary("momentum", 5.0, [1.0, 1.0]), "loss_final_per_seed": [None, None], "diverged": 2,
                 "loss_final_mean": None, "loss_final_std": None}
    fake_run(root / "momentum", diverging, curve=False)
    curve = pd.DataFrame([(s, t, 1.0, 10.0 ** t) for s in range(2) for t in range(10, 101, 10)],
                         columns=["seed", "step", "train_time_s", "loss"])  # grows past any axis
    curve.to_csv(root / "momentum" / "curve.csv", index=False)
    assert aggregate.main([str(root), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "aggregate.csv")
    adam, lodo = table[table.optimizer == "adam"].iloc[0], table[table.optimizer == "lodo"].iloc[0]
    assert len(table) == 3 and adam.seeds == 3 and adam.runs == 3 and lodo.seeds == 3
    np.testing.assert_allclose([adam.loss_mean, adam.loss_std], [np.mean([4, 5, 9]), np.std([4, 5, 9])])
    np.testing.assert_allclose([lodo.loss_mean, lodo.loss_std], [1.5, 0.5])
    assert lodo.diverged == 1 and table[table.optimizer == "momentum"].iloc[0].diverged == 2
    md = (tmp_path / "out" / "aggregate.md").read_text()
    assert "| 3 runs (aggregate.csv lists them) |" in md and "1.5 ± 0.5" in md
    assert (tmp_path / "out" / "aggregate_curves.png").stat().st_size > 10_000
