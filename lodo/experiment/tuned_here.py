"""Every optimizer's loss with the values this project's genetic tuner found, for the extended tables.

The paper's optimizers run in Tables 1 and 8 with the paper's tuned values;
the newer ones with values from this project's GA. To compare them all tuned by
the same procedure, the extended tables add a column with each optimizer's loss
at its GA values on the same seeds (0–7), steps and report window:

- a run whose hyperparameters are its sweep's ``tuned.yaml`` (the newer
  optimizers, installed in ``configs/tuned/``): the run's own loss;
- otherwise ``summary.csv``'s ``loss_ours`` (``scripts/tuning_summary.py``'s
  evaluation of the GA's values on seeds 0–7, which the paper's optimizers have);
- neither: no entry (``None``), printed "–".
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml



class TunedHereError(ValueError):
    """A tuning results folder or summary that cannot be read: one line naming it and the fix."""


class TunedHere:
    """The GA-tuned loss of each run's (task, optimizer), read from a tuning results folder (results/tuning)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise TunedHereError(f"--tuned-here {self.folder} is not a folder: pass the tuning results (results/tuning)")
        path = self.folder / "summary.csv"
        self.evaluated = {}
        if path.exists():
            try:
                frame = pd.read_csv(path)
                rows = frame[["task", "optimizer", "loss_ours", "loss_ours_std", "diverged_ours", "seeds",
                              "eval_steps"]].to_dict("records")
            except (OSError, ValueError, KeyError) as err:
                raise TunedHereError(f"{path} is unreadable ({type(err).__name__}): rebuild it with "
                                  f"scripts/tuning_summary.py runs/tuning {self.folder}") from None
            self.evaluated = {(r["task"], r["optimizer"]): r for r in rows}

    def tuned_values(self, task: str, optimizer: str) -> dict | None:
        path = self.folder / task / optimizer / "tuned.yaml"
        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return values if isinstance(values, dict) else None

    def runs_at_tuned_values(self, run) -> bool:
        """True when every value of the run's sweep's tuned.yaml is the run's own (to rounding)."""
        values = self.tuned_values(run.summary.get("task"), run.optimizer)
        mine = run.summary.get("hyperparameters") or {}
        if not values:
            return False
        for key, value in values.items():
            have = mine.get(key)
            if isinstance(value, (int, float)) and isinstance(have, (int, float)):
                if not math.isclose(float(have), float(value), rel_tol=1e-6, abs_tol=0.0):
                    return False
            elif have != value:
                return False
        return True

    def loss(self, run) -> dict | None:
        """{mean, std, diverged, seeds, source} of the run's (task, optimizer) at GA values, or None."""
        s = run.summary
        if self.runs_at_tuned_values(run):
            return {"mean": s["loss_final_mean"], "std": s["loss_final_std"], "diverged": s["diverged"],
                    "seeds": run.num_seeds, "source": "run"}
        row = self.evaluated.get((s.get("task"), run.optimizer))
        if row is None or int(row["eval_steps"]) != int(s["steps"]) or int(row["seeds"]) != run.num_seeds:
            return None
        return {"mean": float(row["loss_ours"]), "std": float(row["loss_ours_std"]),
                "diverged": int(row["diverged_ours"]), "seeds": int(row["seeds"]), "source": "tuning summary"}

    @staticmethod
    def rank(losses: dict[str, float | None], name: str) -> tuple[int, int] | None:
        """``name``'s place (1 = lowest loss) among the optimizers with a finite loss, and their count."""
        finite = {k: v for k, v in losses.items() if v is not None and math.isfinite(v)}
        if name not in finite:
            return None
        return 1 + sum(v < finite[name] for v in finite.values()), len(finite)
