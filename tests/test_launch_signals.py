"""Workstation launches and stop signals, with real launchers and real processes (2 CPU ranks, gloo).

- launch/workstation.sh (torchrun or accelerate launch under it, with PET_SIGNALS_TO_HANDLE from
  slurm/env.sh): SIGUSR1 to the launcher reaches every rank, which save at the same step boundary and stop;
- a plain `torchrun` (the README's command, no PET_SIGNALS_TO_HANDLE): SIGUSR1 kills the agent itself;
  its orphaned workers notice their launcher is gone, save at the next step boundary and exit,
  instead of training on unsupervised.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST_RUN, REPO

ARGS = [*FAST_RUN, "parallelism=ddp", "train.max_steps=300", "checkpoint.every=0", "logging.progress_bar=false",
        "train.check_isolation=false"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SFT_OUTPUT_DIR", "PET_", "TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                "MASTER_", "TORCH_ELASTIC"))}
    return dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _loss_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [e["step"] for e in map(json.loads, path.read_text().splitlines()) if "loss" in e]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(cmd: list[str], run: Path, log: Path, env: dict) -> subprocess.Popen:
    # Output to a file, not a pipe: orphaned workers must never block on a pipe nobody reads.
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(_loss_steps(run)) < 2:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no training steps in time: " + log.read_text()[-3000:]
        time.sleep(0.2)
    return proc


def _saved_step(run: Path) -> int:
    latest = run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip()
    return json.loads((latest / "train_state.json").read_text())["step"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_workstation_script_forwards_sigusr1_to_every_rank(launcher, tmp_path):
    run, log = tmp_path / "run", tmp_path / "out.log"
    env = dict(_env(), NPROC="2", SFT_LAUNCHER=launcher, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120")
    proc = _start(["bash", str(REPO / "launch" / "workstation.sh"), *ARGS, f"run.output_dir={run}"], run, log, env)
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=200)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    out = log.read_text()
    step = _saved_step(run)
    assert 2 <= step < 300, out[-3000:]
    assert f"stop signal received: saving step {step}" in out
    assert _loss_steps(run) == list(range(1, step + 1))
    assert proc.returncode != 0, out[-3000:]  # the run did not finish (torchrun reports the signal it handled)
    latest = run / "checkpoints" / f"step-{step:06d}"
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]  # both ranks saved
    assert not any(_running(w) for w in workers)
    assert not (run / "run.lock").exists() and not (run / "final").exists()


@pytest.mark.slow
def test_workers_of_a_dead_launcher_save_and_stop(tmp_path):
    run, log = tmp_path / "run", tmp_path / "out.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sft.train",
           *ARGS, f"run.output_dir={run}"]
    proc = _start(cmd, run, log, _env())
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    try:
        proc.send_signal(signal.SIGUSR1)  # not in torchrun's default signals: the agent dies, its workers live on
        assert proc.wait(timeout=60) == -signal.SIGUSR1
        deadline = time.monotonic() + 200
        while any(_running(w) for w in workers):
            assert time.monotonic() < deadline, "orphaned workers still running: " + log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)
    step = _saved_step(run)
    assert 2 <= step < 300, log.read_text()[-3000:]
    assert _loss_steps(run) == list(range(1, step + 1))
    rank_logs = (run / "logs" / "rank0.log").read_text() + (run / "logs" / "rank1.log").read_text()
    assert rank_logs.count("the launcher (parent pid") == 2, rank_logs[-3000:]
    assert not (run / "run.lock").exists() and not (run / "final").exists()
