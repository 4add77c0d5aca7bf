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
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

from sft import distributed as D

log = logging.getLogger(__name__)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = REQUEUE_SIGNALS + (signal.SIGTERM,)
_requeue_wanted = False  # set by the last collective StopFlag.should_stop()


class StopFlag:
    def __init__(self):
        self.received: int | None = None
        self.requeue_wanted = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        # The first signal decides (a TERM that follows the USR1 warning must not cancel the requeue).
        if self.received is None:
            self.received = signum

    def should_stop(self) -> bool:
        """Collective: true on every rank if any rank received a stop signal; then also records,
        identically on every rank, whether any rank was asked to come back (USR1/USR2)."""
        global _requeue_wanted
        stop, back = D.all_reduce_sum([
            1.0 if self.received is not None else 0.0,
            1.0 if self.received in REQUEUE_SIGNALS else 0.0,
        ])
        if stop > 0:
            self.requeue_wanted = _requeue_wanted = back > 0
        return stop > 0


def requeue() -> None:
    """Ask Slurm to put this job back in the queue; it resumes from checkpoints/LATEST when it restarts.
    Only after a USR1/USR2 stop (see the module docstring), only from rank 0, only inside a Slurm job.
    Every rank calls this: no rank exits before the job is requeued, since a rank that exits first
    can end the job step (srun --kill-on-bad-exit) and kill rank 0 before it has asked."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and D.rank() == 0:
        if not _requeue_wanted:
            log.warning("stopped by SIGTERM: not requeueing Slurm job %s (resubmit it to resume from LATEST)", job)
        else:
            try:
                subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
                log.warning("requeued Slurm job %s", job)
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("could not requeue Slurm job %s: %s (resubmit it; it resumes from LATEST)", job, exc)
    D.barrier()
