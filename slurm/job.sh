#!/usr/bin/env bash
# The body of every training batch job (slurm/sft_70b.sh, slurm/sft_lora.sh exec it): topology from
# Slurm, one srun task per node (slurm/node.sh), and the stop signals handed on to the training.
#
#   bash slurm/job.sh [hydra overrides...]     inside an allocation (sbatch, salloc)
#
# Knobs (environment): SFT_EXPERIMENT (prepended as experiment=..., unless an override names one),
# SFT_GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8), SFT_NODES (when SLURM_NNODES is unset),
# SFT_MASTER_ADDR / SFT_MASTER_PORT (rendezvous; default: first node, 20000 + job id % 20000),
# SFT_RUN_ID (default: the job id; set it to continue another job's run directory),
# SFT_LAUNCHER, SFT_PYTHON, SFT_VENV (slurm/env.sh), SFT_DRY_RUN=1 (print the commands, run nothing).
set -euo pipefail
# shellcheck source=slurm/env.sh
source "${SFT_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}/slurm/env.sh"

args=("$@")
if [ -n "${SFT_EXPERIMENT:-}" ]; then
    named=0
    for a in "$@"; do
        case "$a" in experiment=* | +experiment=* | ++experiment=*) named=1 ;; esac
    done
    if [ "$named" = 0 ]; then args=("experiment=$SFT_EXPERIMENT" "$@"); fi
fi

job="${SLURM_JOB_ID:?not inside a Slurm job (run it with sbatch)}"
# The run directory is named by the job (run.output_dir defaults to runs/<run.name>/<SFT_RUN_ID>),
# so a requeued job -- same job id -- finds its checkpoints and resumes from LATEST.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    export SFT_RUN_ID="${SFT_RUN_ID:-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"
else
    export SFT_RUN_ID="${SFT_RUN_ID:-$job}"
fi
export SFT_NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-${SFT_NODES:-1}}}"
export SFT_GPUS_PER_NODE="${SFT_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
# Rendezvous on the job's first node, at a port derived from the job id: two jobs sharing a node do
# not collide, a requeued job reuses it. (Not MASTER_ADDR/PORT: sbatch exports the submitting shell's.)
export MASTER_ADDR="${SFT_MASTER_ADDR:-${hosts[0]}}"
export MASTER_PORT="${SFT_MASTER_PORT:-$((20000 + job % 20000))}"

echo "job $job (restart ${SLURM_RESTART_COUNT:-0}): $SFT_NNODES node(s) x $SFT_GPUS_PER_NODE processes via $SFT_LAUNCHER," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, run id $SFT_RUN_ID, overrides: ${args[*]}" >&2

step=(srun --nodes="$SFT_NNODES" --ntasks="$SFT_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
# srun stopped inheriting --cpus-per-task from sbatch in some Slurm versions: pass it on.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
step+=(bash "$SFT_ROOT/slurm/node.sh" "${args[@]}")

if [ -n "${SFT_DRY_RUN:-}" ]; then
    printf 'sft-step:'
    printf ' %q' "${step[@]}"
    printf '\n'
fi

# `#SBATCH --signal=B:USR1@180` signals this shell only, and bash runs traps only between commands:
# so srun runs in the background, `wait` is interruptible, and each stop signal is handed to srun,
# which forwards it to the node launchers, which forward it to every training process. The training
# saves at the next step boundary; on USR1 rank 0 then requeues the job (same id, same run directory).
srun_pid=""
pending=""
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
    echo "job $job: received SIG$1, forwarding to the training processes" >&2
    if [ -n "$srun_pid" ]; then kill -s "$1" "$srun_pid" 2>/dev/null || true; else pending="$1"; fi
}
for sig in USR1 USR2 TERM; do
    # shellcheck disable=SC2064  # expand $sig now, once per trap
    trap "forward $sig" "$sig"
done

"${step[@]}" &
srun_pid=$!
if [ -n "$pending" ]; then kill -s "$pending" "$srun_pid" 2>/dev/null || true; fi
# wait returns early (status > 128) whenever a trapped signal arrives: keep waiting until srun is gone,
# then collect its real exit status (bash remembers it).
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" || true
done
status=0
wait "$srun_pid" || status=$?
exit "$status"
