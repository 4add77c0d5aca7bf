#!/usr/bin/env bash
#SBATCH --job-name=sft-lora
#SBATCH --nodes=2
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
# LoRA on Llama-3-8B over a large dataset (experiment=llama3_8b_lora_large), 2 nodes x 8 GPUs.
# Submit from the repository root; every argument is a Hydra override:
#
#   sbatch slurm/sft_lora.sh data.path=/data/chats.jsonl
#   sbatch --nodes=1 slurm/sft_lora.sh data.path=/data/chats.jsonl peft.r=64 optim.lr=1e-4
#
# Tokenize once beforehand with slurm/prepare.sh (same overrides). Preemption, requeue and the run
# directory work as in slurm/sft_70b.sh.
set -euo pipefail
for candidate in "${SFT_ROOT:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "$0")/.." && pwd)"; do
    if [ -n "$candidate" ] && [ -f "$candidate/slurm/job.sh" ]; then export SFT_ROOT="$candidate"; break; fi
done
if [ ! -f "${SFT_ROOT:-}/slurm/job.sh" ]; then
    echo "error: cannot find the sft repository: submit from its root or set SFT_ROOT" >&2
    exit 2
fi
export SFT_EXPERIMENT="${SFT_EXPERIMENT-llama3_8b_lora_large}"
exec bash "$SFT_ROOT/slurm/job.sh" "$@"
