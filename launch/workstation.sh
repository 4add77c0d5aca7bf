#!/usr/bin/env bash
# Train on this machine with N processes (one per GPU; or CPU processes on gloo for a smoke test).
# Every argument is a Hydra override; the Hydra config decides the parallelism.
#
#   launch/workstation.sh experiment=llama3_8b_lora data=jsonl data.path=/data/chats.jsonl
#   NPROC=2 launch/workstation.sh model=tiny parallelism=ddp       # 2 CPU processes, no GPU needed
#
# NPROC defaults to the number of visible GPUs (1 without any). SFT_LAUNCHER=torchrun uses torchrun
# instead of `accelerate launch`; both only start processes. Other knobs: slurm/env.sh.
#
# Stopping: slurm/env.sh exports PET_SIGNALS_TO_HANDLE, so the launcher (torchrun's agent, also inside
# accelerate launch) survives SIGUSR1/SIGUSR2 and forwards every stop signal to all ranks, which save at
# the same step boundary and exit 128+signal (Ctrl-C: 130, SIGTERM: 143). A rank whose launcher dies
# anyway stops at the next step boundary with a checkpoint (sft/preemption.py; tests/test_launch_signals.py).
set -euo pipefail
export SFT_ROOT="${SFT_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}"
# shellcheck source=slurm/env.sh
source "$SFT_ROOT/slurm/env.sh"

if [ -z "${NPROC:-}" ]; then
    NPROC=$("$SFT_PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
# One run id for all ranks, so every rank (and Hydra in each) agrees on runs/<name>/<id>.
export SFT_RUN_ID="${SFT_RUN_ID:-$(date +%Y%m%d-%H%M%S)}"

if [ "$NPROC" -le 1 ]; then
    cmd=("$SFT_PYTHON" -m sft.train "$@")
elif [ "$SFT_LAUNCHER" = torchrun ]; then
    cmd=("$SFT_PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m sft.train "$@")
else
    # MULTI_GPU in the config only means "start N processes with torchrun": it works on CPU too,
    # while `accelerate launch --cpu` starts a single process whatever --num_processes says.
    cmd=("$SFT_PYTHON" -m accelerate.commands.launch
         --config_file "$SFT_ROOT/launch/accelerate/single_node_8gpu.yaml"
         --num_processes "$NPROC" --main_process_port "${MASTER_PORT:-0}"
         -m sft.train "$@")
fi
if [ -n "${SFT_DRY_RUN:-}" ]; then
    printf 'sft-workstation:'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec "${cmd[@]}"
