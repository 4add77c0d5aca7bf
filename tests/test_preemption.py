"""Preemption: stop at a step boundary, save, requeue, resume exactly; never a corrupt LATEST.

- StopFlag: SIGUSR1/SIGUSR2 (time-limit warnings) stop and requeue; SIGTERM (scancel, preemption)
  stops without requeueing;
- a signal that arrives in the middle of a save only raises the flag: the save completes and LATEST
  names it; a process killed (SIGKILL) at any point of a save leaves LATEST on the previous complete
  checkpoint, and the next save of the same step succeeds;
- a real SIGUSR1 sent to a running `python -m sft.train` makes it save at a step boundary and call
  `scontrol requeue $SLURM_JOB_ID` (a stub that records it); started again it resumes from LATEST,
  and its final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sft import checkpoint as ckpt
from sft import preemption

REPO = Path(__file__).resolve().parent.parent
STUBS = REPO / "tests" / "stubs"


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preemption._requeue_wanted = False


@pytest.fixture
def scontrol_calls(monkeypatch):
    calls = []
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setattr(preemption.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    return calls


@pytest.mark.parametrize("signals, requeued", [
    ([signal.SIGUSR1], True), ([signal.SIGUSR2], True), ([signal.SIGTERM], False),
    ([signal.SIGUSR1, signal.SIGTERM], True),  # the TERM that follows the warning does not cancel the requeue
])
def test_stop_flag_requeues_only_after_a_time_limit_warning(signals, requeued, restore_signals, scontrol_calls):
    flag = preemption.StopFlag()
    assert not flag.should_stop()
    for sig in signals:
        os.kill(os.getpid(), sig)  # handled at once, in the main thread
    assert flag.should_stop()
    preemption.requeue()
    assert scontrol_calls == ([["scontrol", "requeue", "99"]] if requeued else [])


class FakeEngine:
    """Writes a few files like an engine's sharded save; `during` runs in the middle of it."""

    def __init__(self, during=None):
        self.during = during

    def save_state(self, directory):
        (Path(directory) / "shard-0").write_bytes(b"x" * 1000)
        if self.during:
            self.during()
        (Path(directory) / "shard-1").write_bytes(b"y" * 1000)


def test_signal_during_a_save_only_sets_the_flag(tmp_path, restore_signals):
    flag = preemption.StopFlag()
    ckpt.save_checkpoint(str(tmp_path), 1, FakeEngine(), {"step": 1}, keep=2)
    final = ckpt.save_checkpoint(str(tmp_path), 2, FakeEngine(lambda: os.kill(os.getpid(), signal.SIGUSR1)),
                                 {"step": 2}, keep=2)
    assert flag.received == signal.SIGUSR1 and flag.should_stop()
    assert ckpt.latest_checkpoint(tmp_path) == final
    assert {p.name for p in final.iterdir()} >= {"shard-0", "shard-1", "train_state.json", "rng"}
    assert not list((tmp_path / "checkpoints").glob(".*"))


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from sft import checkpoint as ckpt

    run_dir, where = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    class Engine:
        armed = False

        def save_state(self, directory):
            (Path(directory) / "shard-0").write_bytes(b"x" * 1000)
            if self.armed and where == "shards":  # half of the new checkpoint's shards are written
                die()

    engine = Engine()
    ckpt.save_checkpoint(run_dir, 1, engine, {"step": 1}, keep=2)
    engine.armed = True
    if where == "before-latest":  # the new checkpoint is renamed into place, LATEST not yet rewritten
        original = ckpt._write_atomic
        ckpt._write_atomic = lambda path, text: die() if path.name == "LATEST" else original(path, text)
    if where == "latest-tmp":  # LATEST's temporary file is written, not yet renamed over LATEST
        replace = ckpt.os.replace
        ckpt.os.replace = lambda src, dst: die() if Path(dst).name == "LATEST" else replace(src, dst)
    ckpt.save_checkpoint(run_dir, 2, engine, {"step": 2}, keep=2)
""")


@pytest.mark.parametrize("where", ["shards", "before-latest", "latest-tmp"])
def test_killed_during_a_save_latest_still_names_the_previous_checkpoint(tmp_path, where):
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), where], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-000001"
    assert json.loads((latest / "train_state.json").read_text()) == {"step": 1}
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step-000001\n"
    # The resumed run saves the same step again, over whatever the killed attempt left behind.
    final = ckpt.save_checkpoint(str(tmp_path), 2, FakeEngine(), {"step": 2}, keep=2)
    assert ckpt.latest_checkpoint(tmp_path) == final
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step-000001", "step-000002"]


FAST = ["model=tiny", "data.eval_max=16", "eval.every=0", "eval.generate=0", "run.demo=false",
        "train.global_batch_size=4", "train.micro_batch_size=4", "optim.warmup_steps=2",
        "checkpoint.every=0", "logging.progress_bar=false"]


def _train(run_dir: Path, max_steps: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sft.train", *FAST, f"train.max_steps={max_steps}",
                             f"run.output_dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _loss_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [e["step"] for e in map(json.loads, path.read_text().splitlines()) if "loss" in e]


@pytest.mark.slow
def test_sigusr1_saves_at_a_step_boundary_requeues_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    job = str(random.randint(1000, 9999))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SFT_OUTPUT_DIR", "RANK", "WORLD_SIZE"))}
    # One thread per process: two of them run side by side, and every run computes alike.
    env.update(PATH=f"{STUBS}:{env['PATH']}", STUB_LOG=str(tmp_path / "stub.log"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    max_steps = 10
    # The uninterrupted reference runs alongside (no Slurm job: nothing to requeue).
    reference = _train(tmp_path / "reference", max_steps, env)
    preempted_env = dict(env, SLURM_JOB_ID=job)
    run_dir = tmp_path / "preempted"
    first = _train(run_dir, max_steps, preempted_env)
    try:
        deadline = time.monotonic() + 240
        while len(_loss_steps(run_dir)) < 2:
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "no training steps in time"
            time.sleep(0.1)
        first.send_signal(signal.SIGUSR1)
        out1, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, out1
    saved = json.loads((ckpt.latest_checkpoint(run_dir) / "train_state.json").read_text())
    assert 2 <= saved["step"] < max_steps, out1
    assert _loss_steps(run_dir) == list(range(1, saved["step"] + 1))  # stopped right after the saved step
    assert f"stop signal received: saving step {saved['step']}" in out1
    assert (tmp_path / "stub.log").read_text() == f"scontrol requeue {job}\n"
    assert not (run_dir / "final").exists()

    second = _train(run_dir, max_steps, preempted_env)
    out2, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out2
    assert f"resumed from {run_dir}/checkpoints/step-{saved['step']:06d} at step {saved['step']}" in out2
    assert _loss_steps(run_dir) == list(range(1, max_steps + 1))
    out_ref, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out_ref

    got = load_file(run_dir / "final" / "model.safetensors")
    want = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
