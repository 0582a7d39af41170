"""The command line: ``python -m lodo.run task=… optimizer=… steps=… seed=… num_seeds=…``.

What a run writes is described in ``lodo.experiment.job``. Never lose work: a
run started again in the same folder resumes from its newest intact checkpoint
(``checkpoint.resume=false`` starts afresh), a finished one is skipped
(``already finished: <dir>``), a folder that is not the runner's or that
another run holds is refused untouched (``lodo.experiment.run_folder``), and
SIGTERM, SIGINT, SIGHUP or submitit's SIGUSR2 make the run checkpoint, say so
and exit with the status it names (``lodo.experiment.preemption``). Bad input,
and a full disk, stop the run with one line, ``error: …``, and exit status 2.

TensorFlow is imported only once the settings have been checked (``main``), so a
bad command line is refused in about a second.
"""

from __future__ import annotations

import errno
import re
import os
import signal
import sys
import traceback
from pathlib import Path


import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from hydra._internal.utils import get_args_parser  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from lodo.experiment import config, console, gpus, outputs, registry, run_folder  # noqa: E402
from lodo.experiment.checkpoints import CheckpointError  # noqa: E402
from lodo.experiment.config import ConfigError  # noqa: E402
from lodo.experiment.preemption import Interrupted, Preemption  # noqa: E402


@hydra.main(config_path=str(registry.CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    return execute(cfg, out_dir)


def execute(cfg: DictConfig, out_dir: Path) -> dict:
    """One job in ``out_dir`` (what ``main`` runs once Hydra has composed the config and made the folder).

    Signals are deferred for the whole job (``lodo.experiment.preemption``); every way it can fail ends
    in one ``error:`` line and exit status 2, every signal in one line that names the exit status.
    """
    with Preemption(process=True) as preemption:
        try:
            return _execute(cfg, out_dir, preemption)
        except (ConfigError, CheckpointError) as err:
            if not isinstance(err, run_folder.FolderError):  # a folder refused is left exactly as it was
                run_folder.discard_if_empty(out_dir)
            fail(str(err))
        except Interrupted as err:
            sys.stdout.flush()
            print(f"stopped at once by a third Ctrl-C, without a last checkpoint (the newest one on disk is kept); "
                  f"exiting with status {err.preemption.status}; rerun the same command to resume", flush=True)
            raise SystemExit(err.preemption.status) from None
        except Exception as err:  # noqa: BLE001 - a full disk, whoever raised it; anything else goes on
            if outputs.disk_full(err):
                where = err.filename if isinstance(err, OSError) and err.filename else f"into {out_dir}"
                reason = "disk quota exceeded" if getattr(err, "errno", None) == errno.EDQUOT else \
                    "no space left on device"
                fail(f"{reason} while writing {where}; free space and rerun the same command to resume")
            if not isinstance(err, OSError) or err.filename is None:
                raise
            inside = Path(str(err.filename)).resolve().is_relative_to(out_dir.resolve())
            fail(f"cannot access {err.filename}: {err.strerror}"
                 + ("; choose a writable folder with hydra.run.dir=… (hydra.sweep.dir=… with -m)" if inside else ""))


def _execute(cfg: DictConfig, out_dir: Path, preemption: Preemption) -> dict:
    config.validate(cfg)
    if cfg.get("gpu_per_job"):
        gpus.claim_gpu()
    with run_folder.claim(out_dir), console.logged_to(out_dir / "run.log"):
        result = _run_in_claimed_folder(cfg, out_dir)
        print(where_and_what(cfg, out_dir), flush=True)
    if preemption.requested:  # the signal came after the last step: the run finished, the sweep stops here
        print(f"stopped by {preemption.signal_name} after the run finished (complete in {out_dir}); "
              f"{preemption.how_it_exits()}", flush=True)
        preemption.exit_for_requeue()
    return result


def _run_in_claimed_folder(cfg: DictConfig, out_dir: Path) -> dict:
    if not (cfg.get("checkpoint") or {}).get("resume", True):
        run_folder.start_fresh(out_dir)
    else:
        finished = run_folder.finished_summary(cfg, out_dir)
        if finished is not None:
            print(f"already finished: {out_dir}", flush=True)
            return finished
    # The one deferred import: TensorFlow (quietly) and everything that trains.
    console.start_tensorflow(bool(cfg.get("verbose")))
    from lodo.experiment import distribute, job, provenance
    from tasks.image_base import DataError

    try:
        if registry.is_image_task(cfg.task.name):
            try:  # logical devices must exist before anything (provenance, determinism) starts TensorFlow
                distribute.configure_devices(cfg.distribute)
            except distribute.DistributeError as err:
                raise ConfigError(str(err)) from None
        job.set_determinism(cfg)
        provenance.write(out_dir, cfg)
        result = job.run(cfg, out_dir)
    except DataError as err:
        raise ConfigError(str(err)) from None
    provenance.write(out_dir, cfg, end_time=provenance.utc_now())
    return result


def where_and_what(cfg: DictConfig, out_dir: Path) -> str:
    """The run's last lines: its hyperparameters, the tuned file they came from, and the run folder."""
    hyperparameters = registry.optimizer_options(cfg.optimizer)
    shown = ", ".join(f"{k}={v}" for k, v in hyperparameters.items()) or "none"
    tuned = registry.CONFIG_DIR / "tuned" / cfg.task.name / f"{cfg.optimizer.name}.yaml"
    source = (f"tuned values from {_shown_path(tuned)}, then the command line" if tuned.is_file()
              else f"{cfg.optimizer.name}'s defaults (no tuned file for {cfg.task.name}), then the command line")
    return f"  hyperparameters: {shown} ({source})\n  run folder: {out_dir}"


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def fail(message: str):
    """One line on stderr and exit status 2."""
    sys.stdout.flush()
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def hydra_error(err: BaseException) -> str | None:
    """One line for an error Hydra raises before the run starts (None: not one of those)."""
    if isinstance(err, OSError) and err.filename is not None:
        return (f"cannot create the run folder {err.filename}: {err.strerror}; choose a writable folder with "
                f"hydra.run.dir=… (hydra.sweep.dir=… with -m)")
    if isinstance(err, ValueError) and not isinstance(err, ConfigError):
        frames = traceback.extract_tb(err.__traceback__)
        if frames and f"{os.sep}hydra{os.sep}" in frames[-1].filename:  # e.g. -m together with --cfg
            return " ".join(str(err).split())
        return None
    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        return None
    unknown = re.search(r"Could not override '(optimizer|task)\.([\w.]+)'", str(err))
    if unknown:
        said = unknown_setting(unknown.group(1), unknown.group(2), sys.argv[1:])
        if said:
            return said
    parts = []
    texts = [str(err)] + ([str(err.__cause__)] if isinstance(err.__cause__, OmegaConfBaseException) else [])
    for text in texts:
        lines = iter(text.splitlines())
        for line in lines:
            line = line.strip().rstrip(".")
            if line.startswith("Available options in"):  # then one option per line, then the search path
                group = line.split("'")[1] if "'" in line else "the group"
                options = []
                for option in lines:
                    if not option.startswith("\t"):
                        break
                    options.append(option.strip())
                parts.append(f"valid {group} options: {', '.join(options)}")
                break
            if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "See https://",
                                             "Set the environment variable")) or line in parts:
                continue
            parts.append(line)
    return "; ".join(parts)


def _compose(overrides, return_hydra_config: bool = False) -> DictConfig:
    """The config these command-line overrides compose to, as Hydra's ``main`` will compose it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(registry.CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def preflight(argv: list[str]) -> None:
    """A single run's settings and folder, checked before Hydra creates anything.

    Hydra makes the run folder (and writes ``.hydra/`` and ``run.log`` into it) before ``main`` runs, so
    a run refused there would still leave a folder, or Hydra's files in a user's folder. For a single run
    the config is composed here first, with the same overrides; a multirun's jobs are checked one by one
    in ``main``, and anything Hydra itself refuses is left for Hydra to report.
    """
    from hydra.types import RunMode

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return
    if (args.multirun or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
            or args.config_path or args.config_name or args.config_dir or args.experimental_rerun):
        return
    try:
        cfg = _compose(args.overrides, return_hydra_config=True)
        if cfg.hydra.mode == RunMode.MULTIRUN:
            return
        out_dir = Path(cfg.hydra.run.dir)
        with open_dict(cfg):
            del cfg["hydra"]
    except Exception:  # noqa: BLE001 - Hydra's own refusal, reported by Hydra's path in cli()
        return
    config.validate(cfg)
    run_folder.refuse_foreign(out_dir.absolute())


def unknown_setting(group: str, key: str, argv: list[str]) -> str | None:
    """``optimizer.learning_rate=0.1`` for LODO: name the optimizer (or task) and list what it does take."""
    try:
        args, _ = get_args_parser().parse_known_args(argv)
        name = _compose([o for o in args.overrides if not o.lstrip("+~").startswith(f"{group}.{key}=")])[group].name
        entry = registry.optimizer(name) if group == "optimizer" else registry.task(name)
    except Exception:  # noqa: BLE001 - then Hydra's own words
        return None
    what = "hyperparameter" if group == "optimizer" else "option"
    return (f"{group} {name!r} has no {what} {key!r}; its {what}s: {', '.join(entry.defaults) or 'none'} "
            f"(+{group}.{key}=… adds one its YAML does not list, if its code takes it)")


def cli() -> None:
    try:
        config.check_group_choices(sys.argv[1:])
        preflight(sys.argv[1:])
    except ConfigError as err:
        fail(str(err))
    # Hydra prints its own errors over several lines unless HYDRA_FULL_ERROR is set, in which case it
    # raises them: catch them here and say each in one line (a user who set it gets Hydra's tracebacks).
    user_wants_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a job's own handling: Hydra's start-up, between jobs, a launcher
        sys.stdout.flush()
        print(f"stopped by SIGINT outside a job (jobs in worker processes save their own checkpoints); exiting "
              f"with status {Preemption.STATUS[signal.SIGINT]}; rerun the same command to resume", file=sys.stderr,
              flush=True)
        raise SystemExit(Preemption.STATUS[signal.SIGINT]) from None
    except Exception as err:
        message = None if user_wants_tracebacks else hydra_error(err)
        if message is None:
            raise
        fail(message)
