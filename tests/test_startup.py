"""A start that fails changes nothing; a start that runs owns its directory; a resume guards the trajectory.

Every failed start here is a real `python -m sft.train` against a copy of a real run directory (with
a real checkpoint), hashed before and after: exit 2, one `error:` line, no traceback, nothing changed
and no directory created. Read-only and full filesystems are real tmpfs mounts in a private mount
namespace (`unshare`), not simulated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST_RUN, REPO, run_cli, snapshot

BASE = [*FAST_RUN, "optim.lr=0.003", "logging.progress_bar=false"]


def assert_one_line_refusal(res, pattern: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 2-step run with its checkpoint: the existing run every failed start must leave alone."""
    out = tmp_path_factory.mktemp("base") / "run"
    res = run_cli([*BASE, f"run.output_dir={out}", "train.max_steps=2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "configs" / "000000.yaml").exists() and not (out / "run.lock").exists()
    return out


def _copy(base_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    return run


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip()


def _truncate(run: Path) -> None:
    shard = next(_ckpt(run).glob("*.distcp"))
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)


def _other_data(run: Path) -> list[str]:
    data = run.parent / "other.jsonl"
    recs = [{"messages": [{"role": "user", "content": f"ping {i}"}, {"role": "assistant", "content": f"pong {i}"}]}
            for i in range(40)]
    data.write_text("".join(json.dumps(rec) + "\n" for rec in recs))
    return ["data=jsonl", f"data.path={data}"]


class Holder:
    """A real process on this host holding the run lock of `run` (the first of two runs on one directory)."""

    def __init__(self, run: Path):
        code = ("import sys, time; from sft.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
                "print('held', flush=True); time.sleep(600)")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


# case -> (prepare the copied run dir and return extra overrides, pattern of the one error line)
FAILED_STARTS = {
    "changed_lr": (lambda run: ["optim.lr=0.01"], r"optim\.lr: 0\.003 -> 0\.01"),
    "changed_batch_seed_length": (lambda run: ["train.global_batch_size=16", "run.seed=3", "data.max_length=128"],
                                  r"data\.max_length: 256 -> 128; run\.seed: 0 -> 3; train\.global_batch_size: 8 -> 16"),
    "changed_peft": (lambda run: ["peft=lora", "peft.r=4"], r"peft\.method: none -> lora"),
    "another_dataset": (_other_data, r"data\.path: .* -> .*other\.jsonl"),
    "truncated_checkpoint": (lambda run: _truncate(run) or [], r"__0_0\.distcp: truncated \(\d+ of \d+ bytes\); this checkpoint is damaged"),
    "corrupt_train_state": (lambda run: (_ckpt(run) / "train_state.json").write_text('{"step": 2, "tok') and [],
                            r"train_state\.json: unreadable"),
    "latest_names_missing_checkpoint": (lambda run: (run / "checkpoints" / "LATEST").write_text("step-000009\n") and [],
                                        r"LATEST names step-000009, which is not a complete checkpoint"),
    "model_of_another_shape": (lambda run: ["model.arch.hidden_size=64", "run.resume=force"],
                               r"written for a model of another shape \(Size mismatch"),
}


@pytest.mark.parametrize("case", sorted(FAILED_STARTS))
def test_failed_start_leaves_the_run_directory_as_it_was(case, base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    extra = FAILED_STARTS[case][0](run)
    before = snapshot(run)
    res = run_cli([*BASE, f"run.output_dir={run}", "train.max_steps=4", *extra], timeout=300)
    assert_one_line_refusal(res, FAILED_STARTS[case][1])
    assert snapshot(run) == before


def test_second_run_on_one_directory_is_refused_naming_the_holder(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    holder = Holder(run)
    try:
        before = snapshot(run)
        res = run_cli([*BASE, f"run.output_dir={run}", "train.max_steps=4"], timeout=300)
        assert_one_line_refusal(res, rf"another run is using this directory \(host {re.escape(os.uname().nodename)} "
                                     rf"pid {holder.proc.pid}")
        assert snapshot(run) == before
    finally:
        holder.stop()


def test_failed_start_creates_no_directory(tmp_path):
    run = tmp_path / "new" / "deeper" / "run"
    res = run_cli([*BASE, f"run.output_dir={run}", "data=jsonl", f"data.path={tmp_path / 'missing.jsonl'}"], timeout=300)
    assert_one_line_refusal(res, r"missing\.jsonl: no such file")
    assert not (tmp_path / "new").exists()


def test_resume_force_continues_records_the_change_and_keeps_config_history(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    res = run_cli([*BASE, f"run.output_dir={run}", "train.max_steps=3", "optim.lr=0.01", "run.resume=force"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    forced = [e for e in events if e.get("event") == "resume_forced"]
    assert len(forced) == 1 and forced[0]["step"] == 2 and forced[0]["changed"] == ["optim.lr: 0.003 -> 0.01"], forced
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3]
    assert sorted(p.name for p in (run / "configs").iterdir()) == ["000000.yaml", "000002.yaml"]
    assert "lr: 0.003" in (run / "configs" / "000000.yaml").read_text()
    assert "lr: 0.01" in (run / "config.yaml").read_text()
    assert (run / "config.yaml").read_text() == (run / "configs" / "000002.yaml").read_text()


def test_settings_off_the_trajectory_never_block_a_resume_and_a_stale_lock_is_taken_over(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "start": 1}))
    res = run_cli([*BASE, f"run.output_dir={run}", "train.max_steps=3", "eval.every=1", "checkpoint.every=1",
                   "checkpoint.keep=3", "train.log_every=1", "train.micro_batch_size=2", "logging.progress_bar=true",
                   "train.check_isolation=false"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/step-000002 at step 2" in res.stderr
    assert f"took over the run lock of {os.uname().nodename} pid {dead.pid}" in res.stderr
    assert not (run / "run.lock").exists()


def test_run_lock_is_exclusive_between_processes(tmp_path):
    from sft.errors import SFTError
    from sft.rundir import RunLock

    holder = Holder(tmp_path / "run")
    try:
        with pytest.raises(SFTError, match=rf"pid {holder.proc.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.stop()
    lock = RunLock(tmp_path / "run")  # its holder is dead now: taken over
    lock.acquire()
    assert lock.took_over["pid"] == holder.proc.pid
    lock.release()
    assert not (tmp_path / "run" / "run.lock").exists()


# ---------------------------------------------------------------- read-only and full filesystems (real tmpfs)

def _have_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


needs_unshare = pytest.mark.skipif(not _have_unshare(), reason="needs unprivileged user+mount namespaces (unshare -Urm)")


def _in_tmpfs(mnt: Path, options: str, script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a shell script with a fresh tmpfs mounted at `mnt`, visible to this script only."""
    mnt.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PY=sys.executable, MNT=str(mnt))
    return subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs \"$MNT\" && {script}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _cli(args: list[str]) -> str:
    return "\"$PY\" -m sft.train " + " ".join(f"'{a}'" for a in args)


@needs_unshare
def test_read_only_output_dir_is_one_line(base_run, tmp_path):
    mnt = tmp_path / "ro"
    script = (f"cp -a '{base_run}' \"$MNT/run\" && mount -o remount,ro \"$MNT\" && "
              f"{_cli([*BASE, 'run.output_dir=' + str(mnt / 'run'), 'train.max_steps=4'])}; echo rc=$?; "
              f"{_cli([*BASE, 'run.output_dir=' + str(mnt / 'new'), 'train.max_steps=4'])}; echo rc=$?")
    res = _in_tmpfs(mnt, "size=64m", script)
    assert res.stdout.count("rc=2") == 2, res.stdout + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("read-only filesystem; choose a writable run.output_dir" in e for e in errors), errors


@needs_unshare
def test_full_disk_is_refused_at_start_and_before_a_save(base_run, tmp_path):
    ckpt_bytes = sum(f.stat().st_size for f in _ckpt(base_run).rglob("*") if f.is_file())
    mnt = tmp_path / "disk"
    # At start: not even one checkpoint fits. Nothing is created.
    small = _in_tmpfs(mnt, f"size={ckpt_bytes // 2048}k",
                      f"{_cli([*BASE, 'run.output_dir=' + str(mnt / 'run'), 'train.max_steps=3'])}; echo rc=$?; ls -A \"$MNT\"")
    assert small.stdout.strip() == "rc=2", small.stdout + small.stderr[-3000:]
    assert_one_line_refusal(subprocess.CompletedProcess([], 2, "", small.stderr),
                            r"not enough free disk space for one checkpoint \(needs about [\d.]+ MB, [\d.]+ MB free\)")
    assert "isolation probe" not in small.stderr  # refused from the meta-device estimate, before any model was built
    # Room for one checkpoint and a half: step 1 is saved, the save of step 2 is refused before it starts.
    args = [*BASE, "run.output_dir=" + str(mnt / "run"), "train.max_steps=3", "checkpoint.every=1"]
    full = _in_tmpfs(mnt, f"size={int(ckpt_bytes * 1.6) // 1024}k",
                     f"{_cli(args)}; echo rc=$?; ls -A \"$MNT/run/checkpoints\"; cat \"$MNT/run/checkpoints/LATEST\"")
    assert full.stdout.split() == ["rc=2", "LATEST", "step-000001", "step-000001"], full.stdout + full.stderr[-3000:]
    assert_one_line_refusal(subprocess.CompletedProcess([], 2, "", full.stderr),
                            r"not enough free disk space for checkpoint step-000002 .*checkpoints/LATEST, is intact")


ENOSPC_SAVE = """
import json, os, sys
from pathlib import Path
from sft import checkpoint as ckpt
from sft.errors import SFTError

class Engine:  # writes shards of a given size, like an engine saving its shards
    def __init__(self, nbytes):
        self.nbytes = nbytes
    def save_state(self, directory):
        with open(Path(directory) / "shard-0", "wb") as fh:
            for _ in range(self.nbytes // 65536):
                fh.write(os.urandom(65536))

run = sys.argv[1]
ckpt.save_checkpoint(run, 1, Engine(1 << 20), {"step": 1}, keep=2)
try:
    ckpt.save_checkpoint(run, 2, Engine(8 << 20), {"step": 2}, keep=2)  # checked against step 1's size, then fills the disk
    message = None
except SFTError as exc:
    message = str(exc)
root = Path(run) / "checkpoints"
print(json.dumps({"message": message, "entries": sorted(p.name for p in root.iterdir()),
                  "latest": (root / "LATEST").read_text().strip()}))
"""


@needs_unshare
def test_disk_full_during_a_save_is_one_error_and_leaves_no_partial(tmp_path):
    mnt = tmp_path / "disk"
    script = tmp_path / "save.py"
    script.write_text(ENOSPC_SAVE)
    res = _in_tmpfs(mnt, "size=4m", f"PYTHONPATH='{REPO}' \"$PY\" '{script}' \"$MNT/run\"")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert re.match(r".*checkpoints: disk full while writing checkpoint step-000002 .*resumes from checkpoints/LATEST",
                    got["message"]), got
    assert got["entries"] == ["LATEST", "step-000001"] and got["latest"] == "step-000001", got


# ---------------------------------------------------------------- signals: Ctrl-C and SIGTERM save and say so

def _loss_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [e["step"] for e in map(json.loads, path.read_text().splitlines()) if "loss" in e]


def _wait_for_steps(proc, run: Path, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(_loss_steps(run)) < n:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no training steps in time"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_exits_with_its_code(sig, code, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SFT_OUTPUT_DIR"))}
    proc = subprocess.Popen([sys.executable, "-m", "sft.train", *BASE, "train.max_steps=200", "checkpoint.every=0",
                             f"run.output_dir={run}"], cwd=REPO, env=dict(env, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(proc, run, 2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    saved = json.loads((_ckpt(run) / "train_state.json").read_text())["step"]
    assert 2 <= saved < 200 and _loss_steps(run) == list(range(1, saved + 1))
    assert f"stop signal received: saving step {saved}" in out
    assert not (run / "final").exists() and not (run / "run.lock").exists()


@pytest.fixture(scope="module")
def no_eval_run(tmp_path_factory):
    """12 short conversations, 2 over data.max_length, no eval split, an eval cadence that would evaluate."""
    tmp = tmp_path_factory.mktemp("noeval")
    good = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]}
            for i in range(12)]
    long = [{"messages": [{"role": "user", "content": "x" * 1100}, {"role": "assistant", "content": "too long"}]}] * 2
    data = tmp / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good + long))
    run = tmp / "run"
    res = run_cli([*BASE, f"run.output_dir={run}", "train.max_steps=2", "data=jsonl", f"data.path={data}",
                   "data.eval_fraction=0", "data.max_length=256", "eval.every=1"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return run, res


def test_start_up_line_says_what_was_dropped_and_that_there_is_no_eval(no_eval_run):
    run, res = no_eval_run
    assert re.search(r"12 train / 0 eval examples; dropped from train: 2 over data\.max_length", res.stderr), res.stderr[-3000:]
    assert res.stderr.count("no eval examples, so no evaluation") == 1
    assert "12 train / 0 eval examples; dropped from train: 2 over data.max_length" in (run / "logs" / "rank0.log").read_text()


def test_empty_eval_split_writes_no_eval_events_and_no_nan(no_eval_run):
    run, _ = no_eval_run
    metrics = (run / "metrics.jsonl").read_text()
    assert "eval_loss" not in metrics and "NaN" not in metrics
    assert "NaN" not in (run / "summary.json").read_text()
