"""Stop between steps, checkpoint, and exit (or get requeued), instead of dying mid-step.

SLURM sends SIGTERM before it preempts or kills a job; submitit asks SLURM
for SIGUSR2 (``--signal=USR2@<signal_delay_s>``, or ``$SUBMITIT_PREEMPT_SIGNAL``)
shortly before the time limit, and its own handler for that signal pickles
the job again (the Hydra launcher's ``checkpoint()`` resubmits the same job
with the same arguments, hence the same run folder) and requeues it:
``scontrol requeue`` on SLURM, exit status 144 for submitit's local executor,
which restarts a task that exits with it. A user's Ctrl-C (SIGINT) and a
closed terminal (SIGHUP) are handled the same way.

Inside ``with Preemption() as p:`` those signals only set ``p.requested``.
The training loop checks it between steps (or chunks), saves a checkpoint,
says so in one line and calls ``p.exit_for_requeue()``, which hands over to
submitit's handler when the signal was submitit's (so the job is requeued and,
when it starts again, resumes from the checkpoint), and otherwise exits with
``p.status``: 144 for SIGTERM (SLURM requeues a preempted job itself,
``PreemptMode=REQUEUE``; rerunning the same command resumes it anywhere
else), 130 for SIGINT and 129 for SIGHUP (the shell's "interrupted" statuses,
so a script or ``make`` stops there).

A second signal never interrupts the save or changes the status: it is
acknowledged in one line. The third Ctrl-C is the way out for a user who
cannot wait for the chunk to end: ``Interrupted`` is raised at once, the save
in progress (if any) is abandoned, and the previous checkpoints stay as they
were (SIGQUIT, Ctrl-\\, and kill -9 also exit at once). Once the exit is
decided, further signals are ignored, so the process ends with the status it
printed.

The command line holds one ``Preemption(process=True)`` for the whole job
(signals during start-up, compilation or the writing of the results are
deferred too); a ``with Preemption()`` inside it (the training loop's) joins
that one instead of installing its own.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

FORCE_AFTER = 3  # the Ctrl-C that stops at once, without waiting for the save


def submitit_signal() -> signal.Signals:
    """The signal submitit requeues on (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "none"


class Interrupted(BaseException):
    """The third Ctrl-C: stop now, without a last checkpoint (a BaseException, so no ``except Exception``
    swallows it)."""

    def __init__(self, preemption: "Preemption"):
        super().__init__(f"{FORCE_AFTER} x SIGINT")
        self.preemption = preemption


_PROCESS: "Preemption | None" = None  # the process-wide block the command line holds, while it is active


def _handled() -> tuple:
    return tuple(dict.fromkeys((signal.SIGTERM, submitit_signal(), signal.SIGINT, signal.SIGHUP)))


class Preemption:
    """Turns SIGTERM, SIGINT, SIGHUP and submitit's signal into a flag (``requested``) for a ``with`` block."""

    EXIT_CODE = 144  # submitit's local executor requeues a task that exits with 144 (LOCAL_REQUEUE_RETURN_CODE)
    STATUS = {signal.SIGINT: 130, signal.SIGHUP: 129}  # 128 + the signal: "interrupted", not "requeue me"

    def __init__(self, signals=None, process: bool = False):
        self.signals = tuple(dict.fromkeys(signals or _handled()))
        self.process = process
        self.requested = False
        self.signum: int | None = None
        self.interrupts = 0  # SIGINTs received
        self.exiting = False  # the exit is decided: further signals are ignored
        self.active = False  # False where handlers cannot be installed (a thread other than the main one)
        self._joined: Preemption | None = None  # the process-wide block this one defers to
        self._previous: dict = {}  # the handlers to put back; kept after the block for exit_for_requeue

    def __enter__(self) -> "Preemption":
        global _PROCESS
        if not self.process and _PROCESS is not None and _PROCESS.active:
            self._joined = _PROCESS
            return _PROCESS
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                previous = signal.signal(sig, self._handle)
                # A handler left by an earlier job's exit (a reused worker process): chain to what it replaced.
                owner = getattr(previous, "__self__", None)
                if isinstance(owner, Preemption):
                    previous = owner._previous.get(sig, signal.SIG_DFL)
                self._previous[sig] = previous
            self.active = True
            if self.process:
                _PROCESS = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _PROCESS
        if self._joined is not None:
            self._joined = None
            return
        if self.process and _PROCESS is self:
            _PROCESS = None
        # A process leaving with the status a signal's line named keeps ignoring signals until it is gone:
        # SIGTERM's default action during the interpreter's shutdown would turn the status into 143.
        leaving = self.process and self.exiting and exc_type is not None and issubclass(exc_type, SystemExit)
        if self.active and not leaving:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self.active = False

    def _handle(self, signum, frame) -> None:
        if self.exiting:
            return
        if signum == signal.SIGINT:
            self.interrupts += 1
        if not self.requested:
            self.requested = True
            self.signum = signum
            return
        if signum == signal.SIGINT and self.interrupts >= FORCE_AFTER:
            self.exiting = True
            raise Interrupted(self)
        more = FORCE_AFTER - self.interrupts
        hint = (f"; Ctrl-C {more} more time{'s' if more > 1 else ''} to stop at once without it"
                if signum == signal.SIGINT else "")
        # os.write, not print: a handler that prints while the main thread prints raises "reentrant call".
        _say(f"{signal_name(signum)} received again: finishing the checkpoint first, then exiting with status "
             f"{self.status}{hint}")

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    @property
    def hands_over(self) -> bool:
        """Whether ``exit_for_requeue`` passes the signal on to submitit's handler (which picks the status)."""
        return self.signum == submitit_signal() and callable(self._previous.get(submitit_signal()))

    @property
    def status(self) -> int:
        """The exit status for the first signal received."""
        return self.STATUS.get(self.signum, self.EXIT_CODE)

    def how_it_exits(self) -> str:
        """What the exit line says after "checkpoint saved …; "."""
        if self.hands_over:
            return "handing over to submitit, which requeues the job"
        if self.status == self.EXIT_CODE:
            return f"exiting with status {self.status} for requeueing"
        return f"exiting with status {self.status}"

    def exit_for_requeue(self):
        """Leave the process with ``status`` (or through submitit's requeue); call after the checkpoint is saved."""
        self.exiting = True  # from here on, signals are ignored: the status printed stands
        sys.stdout.flush()
        sys.stderr.flush()
        requeue = self._previous.get(submitit_signal())
        if self.hands_over:
            # submitit's SignalHandler.checkpoint_and_try_requeue: resubmits the job and exits
            # (or raises submitit's UncompletedJobError when the job may not be requeued again).
            requeue(self.signum, None)
        raise SystemExit(self.status)


def _say(line: str) -> None:
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (OSError, ValueError):  # a stderr without a file descriptor (a captured one)
        try:
            sys.stderr.write(line + "\n")
        except (OSError, ValueError, RuntimeError):
            pass


def exit_for_requeue() -> None:
    """Exit with the requeue status outside a ``Preemption`` block."""
    raise SystemExit(Preemption.EXIT_CODE)
