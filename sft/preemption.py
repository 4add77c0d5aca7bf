"""Stop cleanly when the scheduler says so: all ranks agree at a step boundary, save, requeue.

The signal handler only sets a flag; the decision is taken collectively after an optimizer step,
so every rank saves the same step (a rank acting alone would hang the others in a collective).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

from sft import distributed as D

log = logging.getLogger(__name__)
# SIGUSR1: `#SBATCH --signal=USR1@N` before the time limit; SIGTERM: preemption and scancel.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    def __init__(self):
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """Collective: true on every rank if any rank received a stop signal."""
        return D.all_reduce_sum([1.0 if self.received is not None else 0.0])[0] > 0


def requeue() -> None:
    """Ask Slurm to put this job back in the queue; it resumes from checkpoints/LATEST when it restarts."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or D.rank() != 0:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
        log.warning("requeued Slurm job %s", job)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("could not requeue Slurm job %s: %s (resubmit it; it resumes from LATEST)", job, exc)
