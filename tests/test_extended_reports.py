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


def bowl_run(folder: Path, optimizer: str, loss: float, rate: float, diverged: int = 0, diverged_mean=None,
             hyperparameters=None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    budget = {"seconds": 300, "steps": 500, "train_time_s": 3.0, "window": [495, 500], "diverged": diverged,
              "loss_mean": None if diverged else loss, "loss_std": None if diverged else 0.1,
              "diverged_loss_mean": diverged_mean}
    summary = {"task": "noisy_quadratic_bowl", "optimizer": optimizer,
               "hyperparameters": hyperparameters or {}, "task_options": {},
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
    bowl_run(runs / "adamw", "adamw", 14.0, 60_000.0, hyperparameters={"learning_rate": 0.5, "beta_1": 0.3})
    bowl_run(runs / "soap", "soap", 9.0, 1_500.0, hyperparameters={"learning_rate": 0.2})
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


def tuning_results(folder: Path) -> Path:
    """A results/tuning stand-in: the GA's evaluation of Adam, AdamW's tuned.yaml, SOAP's at other values."""
    header = "task,optimizer,loss_ours,loss_ours_std,diverged_ours,seeds,eval_steps\n"
    (folder / "noisy_quadratic_bowl" / "adamw").mkdir(parents=True)
    (folder / "noisy_quadratic_bowl" / "soap").mkdir(parents=True)
    (folder / "summary.csv").write_text(header + "noisy_quadratic_bowl,adam,12.25,0.5,0,2,100\n"
                                        "rosenbrock,bfgs,1.0,0.0,0,2,100\n")
    (folder / "noisy_quadratic_bowl" / "adamw" / "tuned.yaml").write_text("learning_rate: 0.5\nbeta_1: 0.3\n")
    (folder / "noisy_quadratic_bowl" / "soap" / "tuned.yaml").write_text("learning_rate: 0.3\n")
    return folder


def test_tuned_here_column_compares_every_optimizer_at_the_tuners_values(sweep, tmp_path):
    table1 = script("report_table1")
    tuning = tuning_results(tmp_path / "tuning")
    assert table1.main([str(sweep), str(tmp_path / "ext"), "--steps", "100", "--seeds", "2", "--optimizers", "all",
                        "--tuned-here", str(tuning)]) == 0
    lines = (tmp_path / "ext" / "table1.md").read_text().splitlines()
    tuned = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in lines if line.startswith("| ")}
    assert tuned["Optimizer"] == "Tuned here (GA), 100 steps"
    assert tuned["Adam"] == "12.250 ± 0.500"  # from the tuning summary: the paper's optimizer at the GA's values
    assert tuned["AdamW"] == "14.000 ± 0.100"  # its run is at its tuned.yaml's values: the run itself
    assert tuned["SOAP"] == "–"  # run at other values than its tuned.yaml's
    assert tuned["BFGS"] == "–"  # the summary's row is another task's
    frame = __import__("pandas").read_csv(tmp_path / "ext" / "table1.csv")
    assert list(frame.tuned_here_source.fillna("")) == ["tuning summary", "", "run", ""]


def test_tuned_here_ranks_lodo_among_the_finite_losses():
    from lodo.experiment.tuned_here import TunedHere

    assert TunedHere.rank({"lodo": 2.0, "adam": 1.0, "bfgs": None, "sgd": float("nan"), "soap": 3.0}, "lodo") == (2, 3)
    assert TunedHere.rank({"lodo": None, "adam": 1.0}, "lodo") is None


def test_tuned_here_refuses_a_missing_folder_in_one_line(sweep, tmp_path, capsys):
    table1 = script("report_table1")
    out = tmp_path / "ext"
    assert table1.main([str(sweep), str(out), "--steps", "100", "--seeds", "2", "--tuned-here",
                        str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --tuned-here {tmp_path / 'nowhere'} is not a folder: pass the tuning results "
                   "(results/tuning)"]
    assert not out.exists() or not any(out.iterdir())


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


def test_tuned_here_refuses_a_damaged_summary_in_one_line(sweep, tmp_path, capsys):
    table1 = script("report_table1")
    tuning = tuning_results(tmp_path / "tuning")
    (tuning / "summary.csv").write_bytes(b"\x00\xff not, a summary\n")
    assert table1.main([str(sweep), str(tmp_path / "ext"), "--steps", "100", "--seeds", "2",
                        "--tuned-here", str(tuning)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tuning / 'summary.csv'} is unreadable")
    assert "scripts/tuning_summary.py runs/tuning" in err[0]


def test_bench_states_whether_every_newer_optimizer_meets_the_throughput_target():
    bench = script("bench")
    assert bench.newer_line({"adam": 1e5, "lodo": 500.0}) == []  # the paper's optimizers only: no line
    met = bench.newer_line({"adam": 1e5, "soap": 2500.0, "lion": 9e4})
    assert met[-1] == ("Optimizers beyond the paper: 2, slowest `soap` at 2,500 seed-steps/s; the target of 2,000 "
                       "is met by every one.")
    assert bench.newer_line({"soap": 1999.0, "lion": 9e4})[-1].endswith("is missed.")
