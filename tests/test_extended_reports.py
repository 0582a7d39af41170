"""The extended tables: the paper's and the newer optimizers from one sweep folder, and the throughput chart."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bowl_run(folder: Path, optimizer: str, loss: float, rate: float, diverged: int = 0, diverged_mean=None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    budget = {"seconds": 300, "steps": 500, "train_time_s": 3.0, "window": [495, 500], "diverged": diverged,
              "loss_mean": None if diverged else loss, "loss_std": None if diverged else 0.1,
              "diverged_loss_mean": diverged_mean}
    summary = {"task": "noisy_quadratic_bowl", "optimizer": optimizer, "hyperparameters": {}, "task_options": {},
               "steps": 100, "seeds": [0, 1], "loss_final_mean": None if diverged else loss,
               "loss_final_std": None if diverged else 0.1, "loss_final_per_seed": [loss, loss], "diverged": diverged,
               "diverged_loss_mean": diverged_mean, "report_window": [99, 100], "train_time_s": 2.0,
               "seed_steps_per_s": rate, "completed": True, "optimum_loss": 7.412, "time_budget": budget}
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = "".join(f"{s},{t},{0.01 * t},{loss + 10.0 / t}\n" for s in (0, 1) for t in (50, 100))
    (folder / "curve.csv").write_text("seed,step,train_time_s,loss\n" + rows)


@pytest.fixture
def sweep(tmp_path):
    runs = tmp_path / "runs" / "table1"
    bowl_run(runs / "adam", "adam", 15.5, 100_000.0)
    bowl_run(runs / "bfgs", "bfgs", 1e12, 50_000.0, diverged=2, diverged_mean=6.49e11)
    bowl_run(runs / "adamw", "adamw", 14.0, 60_000.0)
    bowl_run(runs / "soap", "soap", 9.0, 1_500.0)
    return runs


def test_the_paper_table_keeps_the_papers_rows_and_the_extended_one_has_all(sweep, tmp_path, capsys):
    table1 = script("report_table1")
    assert table1.main([str(sweep), str(tmp_path / "paper"), "--steps", "100", "--seeds", "2"]) == 0
    err = capsys.readouterr().err
    assert "left out (not among table1's optimizers; --optimizers all reports them): adamw, soap" in err
    paper = (tmp_path / "paper" / "table1.md").read_text()
    assert "| Adam |" in paper and "AdamW" not in paper
    assert "diverged (2/2): 6.49e+11" in paper  # the rule's verdict, its number beside it

    assert table1.main([str(sweep), str(tmp_path / "ext"), "--steps", "100", "--seeds", "2",
                        "--optimizers", "all"]) == 0
    extended = (tmp_path / "ext" / "table1.md").read_text()
    rows = [line.split("|")[1].strip() for line in extended.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["Optimizer", "Adam", "BFGS", "AdamW", "SOAP"]  # the paper's order, then the newer ones
    assert (tmp_path / "ext" / "figure2.png").stat().st_size > 0


def test_throughput_chart_marks_the_newer_optimizers_against_the_target(sweep, tmp_path):
    throughput = script("report_throughput")
    out = tmp_path / "ext"
    assert throughput.main([str(sweep), str(out)]) == 0
    table = (out / "throughput.md").read_text()
    assert "| AdamW | newer | 2 | 60,000 | yes |" in table
    assert "| SOAP | newer | 2 | 1,500 | no |" in table
    assert "| Adam | paper's | 2 | 100,000 |  |" in table
    assert (out / "throughput.png").stat().st_size > 0 and (out / "throughput.pdf").stat().st_size > 0


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_every_script_compiles(path):
    compile(path.read_text(), str(path), "exec")
