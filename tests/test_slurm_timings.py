"""Slurm timings for big models (issue 9.5): the numbers in slurm/*.sh and the 70B experiment hold together.

- the time-limit warning (`#SBATCH --signal=B:USR1@N`) covers a checkpoint save of the job's model, whose
  size comes from the model config (meta device), at the filesystem bandwidth the script states;
- the launcher's shutdown timeout covers that save and ends before the time limit;
- the process-group timeout covers rank 0 reading the checkpoint while the other ranks wait;
- torchrun really waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT (and forwards SIGUSR1 with PET_SIGNALS_TO_HANDLE) on
  this torch, which pyproject.toml's floor promises.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, compose
from sft.model import build_skeleton

# What the scripts assume (stated in their comments): aggregate write bandwidth of the checkpoint
# filesystem, the step in flight plus the ranks' agreement to stop, and the slowest checkpoint read at start.
WRITE_BYTES_PER_S = 2e9
STEP_AND_AGREEMENT_S = 30
SLOW_READ_BYTES_PER_S = 40e6
STATE_BYTES_PER_PARAM = 12  # fp32 weights + AdamW's two fp32 moments (what a full fine-tuning checkpoint holds)


def _script(name):
    return (REPO / "slurm" / name).read_text()


def _signal_lead(text) -> int:
    return int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M).group(1))


def _shutdown_timeout(text) -> int:
    return int(re.search(r'TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)\}', text).group(1))


def test_70b_warning_and_launcher_timeout_cover_a_save():
    cfg = compose(["experiment=llama3_70b_full", "data.path=/d.jsonl"])
    params = sum(p.numel() for p in build_skeleton(cfg.model).parameters())
    save_s = params * STATE_BYTES_PER_PARAM / WRITE_BYTES_PER_S + STEP_AND_AGREEMENT_S
    text = _script("sft_70b.sh")
    lead, shutdown = _signal_lead(text), _shutdown_timeout(text)
    assert save_s == pytest.approx(453, abs=5)  # the ~455 s the script's comment states
    assert lead >= 1.25 * save_s, (lead, save_s)
    assert save_s <= shutdown <= lead - 10, (save_s, shutdown, lead)  # the launcher gives up before the time limit
    assert cfg.run.dist_timeout_minutes * 60 >= params * 2 / SLOW_READ_BYTES_PER_S  # bf16 checkpoint read by rank 0


def test_lora_warning_and_launcher_timeout_cover_a_save():
    text, env = _script("sft_lora.sh"), _script("env.sh")
    lead, shutdown = _signal_lead(text), _shutdown_timeout(env)
    cfg = compose(["experiment=llama3_8b_lora_large", "data.path=/d.jsonl"])
    assert cfg.peft.method == "lora" and cfg.peft.r == 16
    # Adapters on all seven projections of 32 layers: r x (in + out) each, far below a GB.
    arch = cfg.model.arch
    h, i, kv = arch["hidden_size"], arch["intermediate_size"], arch["hidden_size"] * arch["num_key_value_heads"] // arch["num_attention_heads"]
    per_layer = sum(cfg.peft.r * (a + b) for a, b in [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)])
    save_s = per_layer * arch["num_hidden_layers"] * STATE_BYTES_PER_PARAM / WRITE_BYTES_PER_S + STEP_AND_AGREEMENT_S
    assert save_s <= shutdown <= lead - 10, (save_s, shutdown, lead)
    assert cfg.run.dist_timeout_minutes * 60 >= 8.03e9 * 2 / SLOW_READ_BYTES_PER_S


def test_torch_floor_in_pyproject_is_the_one_the_scripts_need():
    text = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert floor and (int(floor.group(1)), int(floor.group(2))) >= (2, 11)


WORKER = r"""
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1]); save_s = float(sys.argv[2])
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
(out / "ready").write_text(str(os.getpid()))
while not got:
    time.sleep(0.05)
time.sleep(save_s)  # "saving"
(out / "saved").write_text("ok")
"""


def _launch_and_warn(tmp_path, shutdown_timeout: int, save_s: float) -> bool:
    """torchrun (1 worker) gets SIGUSR1 as a Slurm warning would deliver it: did the worker finish its save?"""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC", "TORCH_ELASTIC", "SLURM_"))}
    env.update(PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGUSR1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(shutdown_timeout))
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                              str(worker), str(tmp_path), str(save_s)], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ready").exists():
            assert agent.poll() is None and time.time() < deadline, agent.communicate()[0][-2000:]
            time.sleep(0.1)
        agent.send_signal(signal.SIGUSR1)
        agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    return (tmp_path / "saved").exists()


@pytest.mark.slow
def test_torchrun_waits_the_shutdown_timeout_for_the_save(tmp_path):
    """A 4 s "save": killed when the launcher waits 1 s (so the variable is read: the default is 30 s),
    finished when it waits 20 s (so SIGUSR1 was forwarded, not fatal to the agent)."""
    (tmp_path / "short").mkdir()
    (tmp_path / "long").mkdir()
    assert not _launch_and_warn(tmp_path / "short", shutdown_timeout=1, save_s=4)
    assert _launch_and_warn(tmp_path / "long", shutdown_timeout=20, save_s=4)
