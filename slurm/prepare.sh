#!/usr/bin/env bash
#SBATCH --job-name=sft-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#
# Tokenize, template, mask and plan the packing once, into the shared cache (SFT_CACHE), on CPUs:
# give it the overrides of the training job, so it builds exactly the cache that job looks up.
#
#   jid=$(sbatch --parsable slurm/prepare.sh experiment=llama3_70b_full data.path=/data/chats.jsonl)
#   sbatch --dependency=afterok:$jid slurm/sft_70b.sh data.path=/data/chats.jsonl
#
# SFT_EXPERIMENT=NAME prepends experiment=NAME (like the training scripts do); data.num_proc defaults
# to the CPUs of the job. Knobs: see slurm/env.sh. SFT_DRY_RUN=1 prints the command only.
set -euo pipefail
for candidate in "${SFT_ROOT:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "$0")/.." && pwd)"; do
    if [ -n "$candidate" ] && [ -f "$candidate/slurm/env.sh" ]; then export SFT_ROOT="$candidate"; break; fi
done
if [ ! -f "${SFT_ROOT:-}/slurm/env.sh" ]; then
    echo "error: cannot find the sft repository: submit from its root or set SFT_ROOT" >&2
    exit 2
fi
# shellcheck source=slurm/env.sh
source "$SFT_ROOT/slurm/env.sh"

args=()
if [ -n "${SFT_EXPERIMENT:-}" ]; then args+=("experiment=$SFT_EXPERIMENT"); fi
# The job's CPUs as worker processes, unless an override chooses (Hydra keeps the last value).
args+=("data.num_proc=${SLURM_CPUS_PER_TASK:-$(nproc)}" "$@")
cmd=("$SFT_PYTHON" -m sft.prepare "${args[@]}")
if [ -n "${SFT_DRY_RUN:-}" ]; then
    printf 'sft-prepare:'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec "${cmd[@]}"
