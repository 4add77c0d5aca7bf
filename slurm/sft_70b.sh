#!/usr/bin/env bash
#SBATCH --job-name=sft-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Full fine-tuning of Llama-3-70B with FSDP2 (experiment=llama3_70b_full), 8 nodes x 8 GPUs.
# Submit from the repository root; every argument is a Hydra override:
#
#   sbatch slurm/sft_70b.sh data.path=/data/chats.jsonl optim.lr=1e-5 train.max_steps=2000
#   sbatch --nodes=4 slurm/sft_70b.sh data.path=/data/chats.jsonl     # fewer nodes, same global batch
#
# The run directory is runs/<run.name>/<job id> (or run.output_dir=...). 600 s before the time limit
# the job saves at a step boundary and requeues itself; the requeued job resumes from
# checkpoints/LATEST. Knobs: see slurm/job.sh and slurm/env.sh (SFT_LAUNCHER=torchrun, SFT_VENV, ...).
#
# Timings (tests/test_slurm_timings.py checks that they stay consistent):
# - --signal=B:USR1@600: a 70B checkpoint is 847 GB (70.6B parameters x 12 bytes: fp32 weights and two
#   fp32 AdamW moments), written by all 64 ranks at once. At 2 GB/s aggregate (250 MB/s per node, a
#   modest parallel filesystem) that is ~425 s, plus the step in flight when the warning comes (~10 s
#   at 0.5M tokens per step) and the ranks' agreement to stop: ~455 s, inside 600 with a 1.3x margin.
#   A slower filesystem: raise both numbers together (save time = checkpoint bytes / bandwidth; the
#   first periodic checkpoint's time is in the log).
# - TORCH_ELASTIC_SHUTDOWN_TIMEOUT=570: after forwarding the signal, the launcher on each node waits this
#   long for its processes to finish the save before it kills them (torchrun's default, 30 s, would kill
#   every 70B save). It covers the ~455 s save and ends 30 s before the time limit, where Slurm sends
#   TERM and, KillWait (30 s) later, KILL. Honoured from torch 2.11 (pyproject.toml's floor).
# - run.dist_timeout_minutes=60 (conf/experiment/llama3_70b_full.yaml): the process-group timeout must
#   outlast rank 0 reading the 141 GB bf16 checkpoint while 63 ranks wait for it.
set -euo pipefail
# sbatch runs a copy of this file from a spool directory, so find the repository from the submit
# directory (or SFT_ROOT); outside sbatch, from this file's location.
for candidate in "${SFT_ROOT:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "$0")/.." && pwd)"; do
    if [ -n "$candidate" ] && [ -f "$candidate/slurm/job.sh" ]; then export SFT_ROOT="$candidate"; break; fi
done
if [ ! -f "${SFT_ROOT:-}/slurm/job.sh" ]; then
    echo "error: cannot find the sft repository: submit from its root or set SFT_ROOT" >&2
    exit 2
fi
export SFT_EXPERIMENT="${SFT_EXPERIMENT-llama3_70b_full}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-570}"  # see Timings above
# Preflight on the batch host before any srun: a run predicted not to fit fails here in seconds, saying why
# (python -m sft.plan; its report goes to plan-<job id>.json). SFT_PLAN=0 skips it.
if [ "${SFT_PLAN:-1}" != 0 ] && [ -z "${SFT_DRY_RUN:-}" ]; then
    # shellcheck source=slurm/env.sh
    (source "$SFT_ROOT/slurm/env.sh" && "$SFT_PYTHON" -m sft.plan --default-experiment "$SFT_EXPERIMENT" \
        cluster.nodes="${SLURM_NNODES:-1}" cluster.gpus_per_node="${SFT_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}" \
        plan.out="plan-${SLURM_JOB_ID:-local}.json" "$@") || exit $?
fi
# shellcheck disable=SC2031  # env.sh changed SFT_ROOT only inside the preflight's subshell
exec bash "$SFT_ROOT/slurm/job.sh" "$@"
