"""Stop between steps, checkpoint, and get requeued, instead of dying mid-step.

SLURM sends SIGTERM before it preempts or kills a job; submitit asks SLURM
for SIGUSR2 (``--signal=USR2@<signal_delay_s>``, or ``$SUBMITIT_PREEMPT_SIGNAL``)
shortly before the time limit, and its own handler for that signal pickles
the job again (the Hydra launcher's ``checkpoint()`` resubmits the same job
with the same arguments, hence the same run folder) and requeues it:
``scontrol requeue`` on SLURM, exit status 144 for submitit's local executor,
which restarts a task that exits with it.

Inside ``with Preemption() as p:`` those signals only set ``p.requested``.
The training loop checks it between steps (or chunks), saves a checkpoint
and calls ``p.exit_for_requeue()``, which hands over to submitit's handler
when the signal was submitit's (so the job is requeued and, when it starts
again, resumes from the checkpoint), and otherwise exits with
``Preemption.EXIT_CODE``: SLURM requeues a preempted job itself
(``PreemptMode=REQUEUE``, jobs submitted with ``--requeue``), and rerunning
the same command resumes it anywhere else.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def submitit_signal() -> signal.Signals:
    """The signal submitit requeues on (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


class Preemption:
    """Turns SIGTERM and submitit's signal into a flag (``requested``) for the duration of a ``with`` block."""

    EXIT_CODE = 144  # submitit's local executor requeues a task that exits with 144 (LOCAL_REQUEUE_RETURN_CODE)

    def __init__(self, signals=None):
        self.signals = tuple(dict.fromkeys(signals or (signal.SIGTERM, submitit_signal())))
        self.requested = False
        self.signum: int | None = None
        self.active = False  # False where handlers cannot be installed (a thread other than the main one)
        self._previous: dict = {}  # the handlers to put back; kept after the block for exit_for_requeue

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.active = True
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self.active = False

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def exit_for_requeue(self):
        """Leave the process so that the job is requeued (call after the checkpoint is saved)."""
        sys.stdout.flush()
        sys.stderr.flush()
        requeue = self._previous.get(submitit_signal())
        if self.signum == submitit_signal() and callable(requeue):
            # submitit's SignalHandler.checkpoint_and_try_requeue: resubmits the job and exits
            # (or raises submitit's UncompletedJobError when the job may not be requeued again).
            requeue(self.signum, None)
        raise SystemExit(self.EXIT_CODE)


def exit_for_requeue() -> None:
    """Exit with the requeue status outside a ``Preemption`` block."""
    raise SystemExit(Preemption.EXIT_CODE)
