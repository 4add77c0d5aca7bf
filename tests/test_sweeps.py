"""Sweeps and run directories.

- `python -m sft.train -m optim.lr=A,B` runs one job per override set (Hydra's basic launcher: one after
  another here; conf/hydra/launcher/sft_local.yaml: side by side through submitit), each in its own run
  directory <sweep dir>/<job number>, which is also Hydra's output directory for that job;
- with hydra/launcher=sft_slurm the same sweep is ONE sbatch of a job array with one task per override
  set, carrying the preemption settings (a stub sbatch records the script submitit writes);
- a 2-process run (torchrun, via launch/workstation.sh) has the same run directory on both ranks and it
  is Hydra's output directory on both; nothing else is created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STUBS = REPO / "tests" / "stubs"
FAST = ["model=tiny", "data.eval_max=16", "eval.every=0", "eval.generate=0", "run.demo=false",
        "train.global_batch_size=4", "train.micro_batch_size=4", "optim.warmup_steps=1", "train.max_steps=2",
        "checkpoint.every=0", "logging.progress_bar=false"]


def clean_env(tmp_path: Path, **extra) -> dict:
    drop = ("SLURM_", "SFT_RUN_ID", "SFT_OUTPUT_DIR", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC",
            "SUBMITIT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONPATH=f"{REPO}:{STUBS}", PYTHONUNBUFFERED="1", XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def probe_args(out: Path) -> list[str]:
    return ["+hydra.callbacks.probe._target_=hydra_probe.RecordOutputDir", f"+hydra.callbacks.probe.out={out}"]


def run_dirs(root: Path) -> list[Path]:
    """Every directory holding a run (a config.yaml written by sft.train)."""
    return sorted(p.parent for p in root.rglob("config.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "sft_local"])
def test_sweep_gives_each_job_its_own_run_directory(tmp_path, launcher):
    select = [] if launcher == "basic" else [f"hydra/launcher={launcher}"]
    # sft_local runs the two jobs side by side: one thread each.
    threads = {} if launcher == "basic" else {"OMP_NUM_THREADS": 1}
    proc = subprocess.run([sys.executable, "-m", "sft.train", "-m", *select, *FAST, *probe_args(tmp_path / "probe"),
                           "optim.lr=1e-3,2e-3"],
                          cwd=tmp_path, env=clean_env(tmp_path, SFT_RUN_ID="sweep1", **threads), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep_dir = tmp_path / "runs" / "demo" / "sweep1"
    assert run_dirs(tmp_path) == [sweep_dir / "0", sweep_dir / "1"]
    for num, lr in ((0, 1e-3), (1, 2e-3)):
        job_dir = sweep_dir / str(num)
        config = (job_dir / "config.yaml").read_text()
        assert f"output_dir: {job_dir}\n" in config and f"lr: {lr}\n" in config
        assert (job_dir / "final" / "model.safetensors").exists() and (job_dir / "logs" / "rank0.log").exists()
        assert [e["step"] for e in map(json.loads, (job_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in e] == [1, 2]
    records = [json.loads(p.read_text()) for p in (tmp_path / "probe").iterdir()]
    assert sorted((r["job"], r["hydra_output_dir"]) for r in records) == [(0, str(sweep_dir / "0")), (1, str(sweep_dir / "1"))]
    if launcher == "sft_local":
        assert (sweep_dir / ".submitit").is_dir()  # the submitit logs sit beside the job directories


def test_slurm_sweep_submits_one_array_job_with_preemption_settings(tmp_path):
    stub_log = tmp_path / "stub.log"
    env = clean_env(tmp_path, PATH=f"{STUBS}:{os.environ['PATH']}", STUB_LOG=stub_log, SFT_RUN_ID="sweep2")
    proc = subprocess.Popen([sys.executable, "-m", "sft.train", "-m", "hydra/launcher=sft_slurm", *FAST,
                             "optim.lr=1e-3,2e-3", "hydra.launcher.partition=gpu"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The launcher submits, then waits for the jobs (which the stub never runs): stop it then.
        deadline = time.monotonic() + 120
        while not Path(f"{stub_log}.sbatch-1").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "sbatch was not called"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        proc.kill()
        proc.communicate()
    assert len([line for line in stub_log.read_text().splitlines() if line.startswith("sbatch")]) == 1
    script = Path(f"{stub_log}.sbatch-1").read_text()
    sweep_dir = tmp_path / "runs" / "demo" / "sweep2"
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --signal=USR2@180", "#SBATCH --requeue", "#SBATCH --partition=gpu",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --open-mode=append",
                 "#SBATCH --time=1440", "#SBATCH --job-name=sft-demo",
                 f"#SBATCH --output={sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out",
                 f'if [ -f "{tmp_path}/slurm/env.sh" ]; then source "{tmp_path}/slurm/env.sh"; fi',
                 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                 "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))"):
        assert line in script.splitlines(), f"{line!r} not in\n{script}"


@pytest.mark.slow
def test_two_rank_run_has_one_run_directory_which_is_hydras_on_both_ranks(tmp_path):
    probe = tmp_path / "probe"
    env = clean_env(tmp_path, NPROC=2, SFT_LAUNCHER="torchrun", SFT_PYTHON=sys.executable, OMP_NUM_THREADS=1)
    proc = subprocess.run(["bash", str(REPO / "launch" / "workstation.sh"), *FAST, "parallelism=ddp",
                           "train.global_batch_size=8", *probe_args(probe)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run_dir] = run_dirs(tmp_path)
    assert [p for p in (tmp_path / "runs").glob("*/*")] == [run_dir]  # no stray per-rank directory
    assert {p.name for p in (run_dir / "logs").iterdir()} == {"rank0.log", "rank1.log"}
    records = sorted((json.loads(p.read_text()) for p in probe.iterdir()), key=lambda r: r["rank"])
    assert [(r["rank"], r["hydra_output_dir"]) for r in records] == [(0, str(run_dir)), (1, str(run_dir))]
    assert f"output_dir: {run_dir}\n" in (run_dir / "config.yaml").read_text()
