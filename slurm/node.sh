#!/usr/bin/env bash
# One Slurm task per node runs this: it starts the node's training processes with `accelerate launch`
# (or torchrun), each one `python -m sft.train "$@"`. Started by slurm/job.sh through srun; the
# topology comes from the environment job.sh exports:
#   SFT_NNODES, SFT_GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT and Slurm's SLURM_NODEID (this node's rank).
# The launcher replaces this shell (exec), so the signals srun forwards reach it directly; it hands
# them on to the training processes (see PET_SIGNALS_TO_HANDLE in env.sh).
set -euo pipefail
# shellcheck source=slurm/env.sh
source "${SFT_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}/slurm/env.sh"

nnodes="${SFT_NNODES:?set by slurm/job.sh}"
gpus="${SFT_GPUS_PER_NODE:?set by slurm/job.sh}"
node_rank="${SLURM_NODEID:?not inside a Slurm step}"
addr="${MASTER_ADDR:?set by slurm/job.sh}"
port="${MASTER_PORT:?set by slurm/job.sh}"
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    threads=$((SLURM_CPUS_PER_TASK / gpus))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

case "$SFT_LAUNCHER" in
    accelerate)
        # The config file keeps a user's ~/.cache/huggingface/accelerate/default_config.yaml out of
        # the job; every value that matters is given here. accelerate's MULTI_GPU mode is a plain
        # torchrun start (it also works without GPUs, on gloo); `--cpu` would start ONE process.
        cmd=("$SFT_PYTHON" -m accelerate.commands.launch
             --config_file "$SFT_ROOT/launch/accelerate/multi_node.yaml"
             --multi_gpu --num_machines "$nnodes" --num_processes $((nnodes * gpus))
             --machine_rank "$node_rank" --main_process_ip "$addr" --main_process_port "$port"
             --rdzv_backend static --same_network --mixed_precision no --dynamo_backend no
             -m sft.train "$@")
        ;;
    torchrun)
        cmd=("$SFT_PYTHON" -m torch.distributed.run
             --nnodes "$nnodes" --nproc_per_node "$gpus" --node_rank "$node_rank"
             --master_addr "$addr" --master_port "$port"
             -m sft.train "$@")
        ;;
    *)
        echo "error: SFT_LAUNCHER=$SFT_LAUNCHER: expected accelerate or torchrun" >&2
        exit 2
        ;;
esac

if [ -n "${SFT_DRY_RUN:-}" ]; then
    # One line per node: what would run, shell-quoted (tests and `SFT_DRY_RUN=1 bash slurm/...`).
    line=$(printf ' %q' "${cmd[@]}")
    printf 'sft-node %s:%s\n' "$node_rank" "$line"
    exit 0
fi
echo "node $node_rank/$nnodes ($(hostname)): $SFT_LAUNCHER, $gpus processes, rendezvous $addr:$port" >&2
exec "${cmd[@]}"
