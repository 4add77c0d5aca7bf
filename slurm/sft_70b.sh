#!/usr/bin/env bash
#SBATCH --job-name=sft-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
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
# The run directory is runs/<run.name>/<job id> (or run.output_dir=...). 180 s before the time limit
# the job saves at a step boundary and requeues itself; the requeued job resumes from
# checkpoints/LATEST. Knobs: see slurm/job.sh and slurm/env.sh (SFT_LAUNCHER=torchrun, SFT_VENV, ...).
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
exec bash "$SFT_ROOT/slurm/job.sh" "$@"
