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
#
# Timings: --signal=B:USR1@180 is ample here: a LoRA checkpoint holds only the adapters and their AdamW
# state (~42M parameters x 12 bytes = 0.5 GB at r=16), seconds to write, after a step of a few seconds.
# The launcher waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT=170 s (slurm/env.sh) for the save, 10 s before the
# time limit. The process-group timeout (run.dist_timeout_minutes, 30) outlasts
# every rank loading the 16 GB bf16 base before the first collective.
set -euo pipefail
for candidate in "${SFT_ROOT:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "$0")/.." && pwd)"; do
    if [ -n "$candidate" ] && [ -f "$candidate/slurm/job.sh" ]; then export SFT_ROOT="$candidate"; break; fi
done
if [ ! -f "${SFT_ROOT:-}/slurm/job.sh" ]; then
    echo "error: cannot find the sft repository: submit from its root or set SFT_ROOT" >&2
    exit 2
fi
export SFT_EXPERIMENT="${SFT_EXPERIMENT-llama3_8b_lora_large}"
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
