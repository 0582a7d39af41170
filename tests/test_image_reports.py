"""scripts/report_images.py on hand-made run folders: the tables read the summaries, the competitiveness
sentence matches a NumPy mean of the curves, and a diverged run is never called the best."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lodo.experiment import report

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("report_images", ROOT / "scripts" / "report_images.py")
report_images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report_images)

STEPS = 200


def write_run(folder: Path, optimizer: str, losses: dict[int, np.ndarray], diverged: int = 0,
              old_schema: bool = False) -> None:
    """A finished image run: summary.json as lodo.run writes it (the fields reports read) and curve.csv.

    ``old_schema``: the summary as image runs wrote it before every run shared one schema.
    """
    folder.mkdir(parents=True)
    rows = [{"seed": seed, "step": step + 1, "train_time_s": 0.1 * step, "loss": float(loss[step])}
            for seed, loss in losses.items() for step in range(STEPS)]
    pd.DataFrame(rows).to_csv(folder / "curve.csv", index=False)
    final = [float(loss[-2:].mean()) for loss in losses.values()]
    summary = {
        "task": "pixelcnn_mnist", "optimizer": optimizer, "hyperparameters": {"learning_rate": 1e-3},
        "task_options": {"dataset": "fashion_mnist", "data": {"source": "files"}, "batch_size": 256},
        "steps": STEPS, "seeds": sorted(losses), "diverged": diverged, "seed_steps_per_s": 5.0, "batch_size": 32,
        "loss_final_mean": float(np.mean(final)), "loss_final_std": float(np.std(final)),
        "test_loss_mean": 2.5, "test_loss_std": 0.01, "test_images": 50,
        "distribute": {"devices": ["/device:CPU:0"]},
    }
    if old_schema:
        summary = {k: v for k, v in summary.items() if not k.startswith(("test_loss", "seed_steps"))}
        summary.update({"steps_per_s": 5.0, "test_loss": 2.5, "test_images": 50,
                        "at_steps": {"train_loss_mean": float(np.mean(final)), "train_loss_std": float(np.std(final)),
                                     "test_loss_mean": 2.5, "test_loss_std": 0.01}})
    (folder / "summary.json").write_text(json.dumps(summary))


def test_a_summary_written_before_the_one_schema_reads_the_same(tmp_path):
    losses = {0: np.linspace(3, 2, STEPS), 1: np.linspace(4, 2.5, STEPS)}
    tables = []
    for old in (False, True):
        write_run(tmp_path / str(old) / "adam", "adam", losses, old_schema=old)
        runs, _ = report.load_runs(tmp_path / str(old))
        tables.append(report_images.build_loss_table(report.by_optimizer(runs), None))
    pd.testing.assert_frame_equal(*tables)
    assert tables[0].loc[0, "test_loss_steps_mean"] == 2.5 and tables[0].loc[0, "steps_per_s"] == 5.0
    assert tables[0].loc[0, "train_loss_steps_mean"] == pytest.approx(np.mean([2.0, 2.5]), abs=0.01)


def noisy_decay(seed: int, floor: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return floor + 3.0 * np.exp(-np.arange(STEPS) / 40) + rng.normal(0, 0.3, STEPS)


def test_table2_states_lodo_against_the_best_standard_optimizer(tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    curves = {"adam": {0: noisy_decay(1, 3.0), 1: noisy_decay(2, 3.0)},
              "yogi": {0: noisy_decay(3, 2.8), 1: noisy_decay(4, 2.8)},
              "rmsprop": {0: noisy_decay(5, 1.0), 1: noisy_decay(6, 1.0)},  # not one of the rivals the claim names
              "lodo": {0: noisy_decay(7, 2.9), 1: noisy_decay(8, 2.9)}}
    for name, losses in curves.items():
        write_run(runs_dir / name, name, losses)
        (runs_dir / name / "samples.png").write_bytes(name.encode())
    write_run(runs_dir / "momentum", "momentum", {0: np.full(STEPS, 0.5)}, diverged=1)

    def late(losses):  # the last 10% of steps (steps 181..200), per seed, then over seeds
        return np.mean([loss[STEPS - STEPS // 10:].mean() for loss in losses.values()])

    runs, _ = report.load_runs(runs_dir)
    md = report_images.build_table2(runs, None, out)

    expected_lodo, expected_yogi = late(curves["lodo"]), late(curves["yogi"])
    assert expected_yogi < late(curves["adam"])
    sentence = md[md.index("Smoothed training loss"):]
    assert f"LODO {expected_lodo:.3f}" in sentence
    assert f"best of Adam, Yogi: Yogi {expected_yogi:.3f}" in sentence  # diverged Momentum is left out
    assert f"{100 * (expected_lodo / expected_yogi - 1):+.1f}%" in sentence
    table = pd.read_csv(out / "table2.csv").set_index("optimizer")
    assert table.loc["lodo", "train_loss_last_10pct"] == pytest.approx(expected_lodo, rel=1e-6)
    assert np.isnan(table.loc["momentum", "train_loss_last_10pct"])
    assert "Fashion-MNIST (files source), 200 steps, 2 seeds, batch 32, test metrics on 50 test images" in md
    assert "Table 2: autoregressive image generation, standard optimizers and LODO." in md  # the paper's only
    assert "LODO ranks by smoothed training loss 3rd of 4 (best: RMSprop" in md  # diverged Momentum not counted
    assert (out / "table2.md").read_text() == md
    assert (out / "figure4.png").is_file()
    assert (out / "figure10.png").read_bytes() == b"lodo"  # Figure 10 is LODO's; the others sit beside it
    assert (out / "figure10_yogi.png").read_bytes() == b"yogi" and not (out / "figure10_lodo.png").exists()


def test_table2_without_lodo_has_no_comparison(tmp_path):
    write_run(tmp_path / "runs" / "adam", "adam", {0: noisy_decay(1, 3.0)})
    runs, _ = report.load_runs(tmp_path / "runs")
    assert "Smoothed training loss" not in report_images.build_table2(runs, None, tmp_path / "out")


def test_table2_with_one_rival_names_it_alone(tmp_path):
    for name, floor in (("yogi", 2.8), ("lodo", 2.9)):
        write_run(tmp_path / "runs" / name, name, {0: noisy_decay(len(name), floor)})
    runs, _ = report.load_runs(tmp_path / "runs")
    sentence = report_images.build_table2(runs, None, tmp_path / "out").split("Smoothed training loss")[1]
    assert "best of" not in sentence and "; Yogi " in sentence


def test_readme_marker_option_keeps_two_scales_of_one_table_apart(tmp_path):
    write_run(tmp_path / "runs" / "adam", "adam", {0: noisy_decay(1, 3.0)})
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table2 -->\nshort scale\n<!-- /table2 -->\n<!-- table2_long -->\nold\n<!-- /table2_long -->\n")
    argv = [str(tmp_path / "runs"), str(tmp_path / "out"), "--readme", str(readme), "--marker", "table2_long",
            "--steps", str(STEPS), "--seeds", "1"]
    assert report.main(argv, doc="d", stem="table2", make_target="t", build=report_images.build_table2) == 0
    text = readme.read_text()
    assert "short scale" in text and "old" not in text
    assert text.index("<!-- table2_long -->") < text.index("| Adam |") < text.index("<!-- /table2_long -->")


def test_figure5_sorts_by_beta_and_counts_the_runs_it_has(tmp_path):
    for folder, beta, floor in (("beta_0.9", 0.9, 2.9), ("beta_0.0", 0.0, 3.2)):
        write_run(tmp_path / "runs" / folder, "lodo", {0: noisy_decay(1, floor)})
        summary_path = tmp_path / "runs" / folder / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary["hyperparameters"] = {"beta": beta}
        summary_path.write_text(json.dumps(summary))
    runs, _ = report.load_runs(tmp_path / "runs")
    md = report_images.build_figure5(runs, None, tmp_path / "out")
    assert md.index("| 0.0000 |") < md.index("| 0.9000 |")
    assert "LODO with 2 momenta β" in md
    frame = pd.read_csv(tmp_path / "out" / "figure5.csv")
    assert list(frame.beta) == [0.0, 0.9] and (tmp_path / "out" / "figure5.png").is_file()
    for folder, late in zip(("beta_0.0", "beta_0.9"), frame.train_loss_last_10pct):
        curve = pd.read_csv(tmp_path / "runs" / folder / "curve.csv")
        expected = curve[curve.step > 0.9 * curve.step.max()].loss.mean()  # one seed
        assert np.isclose(late, expected) and f"| {late:.3f} |" in md


def test_table2_ranks_lodo_among_every_run_that_did_not_diverge(tmp_path):
    floors = {"adam": 3.0, "yogi": 2.8, "lodo": 2.9, "soap": 2.7, "nadam": 3.1, "lion": 2.95, "lamb": 3.2,
              "muon": 3.05, "adamw": 2.85}  # nine lines: the extended figure's legend goes under the panels
    for i, (name, floor) in enumerate(floors.items()):
        write_run(tmp_path / "runs" / name, name, {0: noisy_decay(i, floor)})
    write_run(tmp_path / "runs" / "psgd_kron", "psgd_kron", {0: np.full(STEPS, 0.1)}, diverged=1)
    runs, _ = report.load_runs(tmp_path / "runs")
    md = report_images.build_table2(runs, None, tmp_path / "out")

    late = {name: noisy_decay(i, floor)[STEPS - STEPS // 10:].mean() for i, (name, floor) in enumerate(floors.items())}
    place = 1 + sum(value < late["lodo"] for value in late.values())
    best = min(late, key=late.get)
    assert best != "psgd_kron"  # the diverged run's 0.1 is never the best
    assert (f"LODO ranks by smoothed training loss {report_images.ordinal(place)} of 9 "
            f"(best: {report.label(best)} {late[best]:.3f}); by test loss 1st of 9" in md)  # all tie at 2.5
    assert md.startswith("| Optimizer") and "Table 2, extended:" in md
    assert (tmp_path / "out" / "figure4.png").is_file()


def test_ordinals_read_right_and_a_lone_lodo_has_no_rank():
    assert [report_images.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"]
    table = pd.DataFrame({"optimizer": ["lodo"], "diverged": [0], "train_loss_last_10pct": [3.0],
                          "test_loss_steps_mean": [2.9]})
    assert report_images.lodo_rank(table) == ""  # alone: no rank to state


@pytest.mark.parametrize("lines", [1, report.CROWDED_LINES, report.CROWDED_LINES + 1, 21])
def test_a_crowded_legend_goes_under_the_panels_and_leaves_room_for_its_rows(lines):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    for i in range(lines):
        axes[0].plot([0, 1], [i, i], label=f"line {i}")
    space = report.place_legend(fig, axes[0], columns=7)
    crowded = lines > report.CROWDED_LINES
    assert (axes[0].get_legend() is None) == crowded
    assert (len(fig.legends) == 1) == crowded
    if crowded:
        rows = -(-lines // 7)
        assert space == pytest.approx(0.035 * (rows + 1))
        assert len(fig.legends[0].get_texts()) == lines
    else:
        assert space == 0.0
    plt.close(fig)
