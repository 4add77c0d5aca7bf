"""Stop cleanly when the scheduler says so: all ranks agree at a step boundary, save, requeue.

The signal handler only sets a flag; the decision is taken collectively after an optimizer step,
so every rank saves the same step (a rank acting alone would hang the others in a collective).
A signal that arrives in the middle of a save only sets the flag too: the save finishes, and the
checkpoint is written under a hidden name and published by LATEST last (sft/checkpoint.py).

Which signal arrived decides what happens after the save:
- SIGUSR1 / SIGUSR2: the time limit is near (`#SBATCH --signal=B:USR1@180` in slurm/*.sh, forwarded
  to every rank; USR2 is submitit's, for Hydra sweeps). The job should come back: rank 0 requeues it
  with `scontrol requeue`, and the requeued job (same id, same run directory) resumes from LATEST.
- SIGTERM: preemption, `scancel`, or the time limit itself. Save and exit, but do not requeue: Slurm
  requeues preempted jobs by itself when the partition says so, and a cancelled job must stay
  cancelled (`scontrol requeue` would bring back even a finished job).
- SIGINT (Ctrl-C): like SIGTERM. A second Ctrl-C aborts at once, without saving (KeyboardInterrupt,
  which the CLI turns into one line).
- The launcher died (torchrun's agent killed by a signal it does not handle, e.g. SIGUSR1 without
  PET_SIGNALS_TO_HANDLE): the worker's parent changes, and it stops like SIGTERM at the next step
  boundary instead of training on, orphaned.

Exit codes (`exit_code()`), so that a script or scheduler can tell a stop from a finished run:
128 + signal number, as a shell reports a process killed by that signal (SIGINT 130, SIGUSR1 138,
SIGUSR2 140, SIGTERM 143; a dead launcher counts as SIGTERM). The one exception is a stop that
requeued its Slurm job: it exits 0, because the job is not over (Slurm starts it again, same id) and a
non-zero status would be recorded against a planned hand-over (FAIL mails, afternotok dependencies,
--kill-on-bad-exit tearing down ranks still finishing). If the requeue request fails, the exit code
is 138/140 like any other stop.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from sft import distributed as D

log = logging.getLogger(__name__)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = REQUEUE_SIGNALS + (signal.SIGTERM, signal.SIGINT)
_requeue_wanted = False  # set by the last collective StopFlag.should_stop()
_stopped_by: int | None = None  # the signal that stopped the run (agreed at a step boundary)
_requeued = False  # requeue() asked Slurm to bring the job back


def _launched_by_agent() -> bool:
    """Started by torchrun's agent (also under accelerate launch), whose death must stop this worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


class StopFlag:
    def __init__(self):
        self.received: int | None = None
        self.requeue_wanted = False
        self.orphaned = False
        self._interrupted_at: float | None = None
        self._pid = os.getpid()
        self._parent = os.getppid() if _launched_by_agent() else None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            if self._interrupted_at is not None:
                # A second Ctrl-C: out now, without saving. Within a second of the first it is the same
                # key press forwarded by the launcher (torchrun's agent passes on the SIGINT the terminal
                # already sent to the whole process group), not the user insisting.
                if time.monotonic() - self._interrupted_at > 1.0:
                    raise KeyboardInterrupt
                return
            self._interrupted_at = time.monotonic()
            if os.environ.get("RANK", "0") == "0" and os.getpid() == self._pid:  # not from forked data workers
                print("\nCtrl-C: saving at the next step boundary, then exiting (Ctrl-C again: exit without saving)",
                      file=sys.stderr, flush=True)
        # The first signal decides (a TERM that follows the USR1 warning must not cancel the requeue).
        if self.received is None:
            self.received = signum

    def launcher_gone(self) -> bool:
        return self._parent is not None and os.getppid() != self._parent

    def should_stop(self) -> bool:
        """Collective: true on every rank if any rank received a stop signal (or lost its launcher);
        then also records, identically on every rank, whether any rank was asked to come back (USR1/USR2)."""
        global _requeue_wanted, _stopped_by
        if self.received is None and self.launcher_gone():
            self.received, self.orphaned = signal.SIGTERM, True
            log.warning("the launcher (parent pid %d) is gone: stopping at this step boundary", self._parent)
        stop, back = D.all_reduce_sum([
            1.0 if self.received is not None else 0.0,
            1.0 if self.received in REQUEUE_SIGNALS else 0.0,
        ])
        if stop > 0:
            self.requeue_wanted = _requeue_wanted = back > 0
            _stopped_by = self.received if self.received is not None else (signal.SIGUSR1 if back > 0 else signal.SIGTERM)
        return stop > 0


def exit_code() -> int | None:
    """The process exit code after a stop (see the module docstring), or None if the run was not stopped."""
    if _stopped_by is None:
        return None
    return 0 if _requeued else 128 + int(_stopped_by)


def requeue() -> None:
    """Ask Slurm to put this job back in the queue; it resumes from checkpoints/LATEST when it restarts.
    Only after a USR1/USR2 stop (see the module docstring), only from rank 0, only inside a Slurm job.
    Every rank calls this: no rank exits before the job is requeued, since a rank that exits first
    can end the job step (srun --kill-on-bad-exit) and kill rank 0 before it has asked."""
    global _requeued
    job = os.environ.get("SLURM_JOB_ID")
    requeued = False
    if job and D.rank() == 0:
        if not _requeue_wanted:
            log.warning("stopped by SIGTERM: not requeueing Slurm job %s (resubmit it to resume from LATEST)", job)
        else:
            try:
                subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
                log.warning("requeued Slurm job %s", job)
                requeued = True
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("could not requeue Slurm job %s: %s (resubmit it; it resumes from LATEST)", job, exc)
    _requeued = bool(D.all_reduce_sum([1.0 if requeued else 0.0])[0])  # every rank exits with the same code
