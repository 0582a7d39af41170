"""A reduced run (scale=smoke, scale=cpu) can never become the paper's table: it lands in a folder of its
own, and the reports refuse runs of another scale than their table's."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lodo.experiment.registry import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def sweep_dir(*overrides: str) -> str:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra.sweep.dir


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_reduced_scale_never_writes_into_the_full_reproductions_folder(experiment):
    full = sweep_dir(f"experiment={experiment}")
    folders = {full, sweep_dir(f"experiment={experiment}", "scale=smoke"), sweep_dir(f"experiment={experiment}", "scale=cpu")}
    assert len(folders) == 3, folders


def report_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(*paths: Path) -> dict:
    found = {}
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        found.update({str(p): p.stat().st_mtime_ns for p in files})
    return found


@pytest.mark.slow  # one multirun in a subprocess
@pytest.mark.long
def test_a_smoke_run_of_an_experiment_changes_nothing_under_results_or_the_readme(tmp_path, capsys):
    before = snapshot(ROOT / "results", ROOT / "README.md")
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # Two of the experiment's six optimizers: the folders and the guard are the same for all of them.
    result = subprocess.run([sys.executable, "-m", "lodo.run", "experiment=table8", "scale=smoke", "progress=false",
                             "optimizer=adam,lodo"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "table8-smoke" / "adam" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "table8").exists()
    # A smoke run keeps no checkpoint once finished (checkpoint.keep_final=false): nothing worth its size.
    assert not list((tmp_path / "runs" / "table8-smoke").rglob("ckpt-*"))

    table8 = report_script("report_table8")
    # What `make report-table8` runs (there: runs/table8, results, README.md), here on copies: nothing to report.
    assert table8.main([str(tmp_path / "runs" / "table8"), str(tmp_path / "results"), "--readme", str(readme)]) == 2
    # Pointed at the smoke runs by hand, the report refuses them: they are not Table 8's scale.
    assert table8.main([str(tmp_path / "runs" / "table8-smoke"), str(tmp_path / "results"), "--readme",
                        str(readme)]) == 2
    err = capsys.readouterr().err
    assert "adam ran 3 steps x 1 seed(s)" in err and "but table8 is made of runs of 200 steps x 8 seeds" in err
    assert "--steps N --seeds M" in err
    assert not (tmp_path / "results").exists() and readme.read_text() == (ROOT / "README.md").read_text()
    # Reported as what they are, elsewhere and without the README, they are fine.
    assert table8.main([str(tmp_path / "runs" / "table8-smoke"), str(tmp_path / "smoke"), "--steps", "3",
                        "--seeds", "1"]) == 0
    assert snapshot(ROOT / "results", ROOT / "README.md") == before


def test_the_report_guard_reads_the_scale_from_the_experiment(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, steps in (("adam", 100000), ("lodo", 3)):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps({
            "task": "noisy_quadratic_bowl", "optimizer": name, "steps": steps, "seeds": list(range(8)), "diverged": 0,
            "loss_final_mean": 1.0, "loss_final_std": 0.1, "completed": True, "seed_steps_per_s": 1.0}))
    table1 = report_script("report_table1")
    assert table1.main([str(runs), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{runs / 'lodo'} ran 3 steps x 8 seed(s), but table1 is made of runs of 100000 steps x 8 seeds" in err
    assert str(runs / "adam") not in err and not (tmp_path / "out").exists()
