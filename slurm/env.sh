# shellcheck shell=bash
# Sourced by every script in slurm/ and launch/: paths, caches, NCCL and launcher settings in one
# place. Every value can be preset in the environment (or in ~/.config/sft/env.sh, sourced last).
#
# Knobs:
#   SFT_ROOT        repository (the scripts find it; set it when submitting from elsewhere)
#   SFT_VENV        virtualenv whose python runs everything (default: $SFT_ROOT/.venv if present)
#   SFT_PYTHON      python interpreter (default: $SFT_VENV/bin/python, else python3 on PATH)
#   SFT_LAUNCHER    accelerate (default) | torchrun: what starts the processes of one node
#   SFT_CACHE       tokenized-data cache shared by prepare and training jobs (a shared filesystem)

: "${SFT_ROOT:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [ -z "${SFT_VENV:-}" ] && [ -x "$SFT_ROOT/.venv/bin/python" ]; then
    SFT_VENV="$SFT_ROOT/.venv"
fi
if [ -z "${SFT_PYTHON:-}" ]; then
    if [ -n "${SFT_VENV:-}" ]; then SFT_PYTHON="$SFT_VENV/bin/python"; else SFT_PYTHON=python3; fi
fi
: "${SFT_LAUNCHER:=accelerate}"
export SFT_ROOT SFT_PYTHON SFT_LAUNCHER
# `python -m sft.*` works from any directory (and without `pip install -e .`).
export PYTHONPATH="$SFT_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Caches. The data cache and compiled DeepSpeed ops are shared by all nodes and by the prepare job;
# Triton's cache stays on node-local disk (it is not safe on NFS).
export SFT_CACHE="${SFT_CACHE:-$SFT_ROOT/.cache/sft}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$SFT_ROOT/.cache/torch_extensions}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/${USER:-sft}-triton}"
# HF_HOME (models, tokenizers) is left as you set it: point it at a shared filesystem on clusters.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HYDRA_FULL_ERROR=1

# NCCL: a rank that dies or hangs fails the job (instead of blocking every other rank until the
# time limit); set NCCL_SOCKET_IFNAME / NCCL_IB_HCA here for your fabric if autodetection is wrong.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# The per-node launcher (torchrun's agent, also inside `accelerate launch`) must survive and
# forward the stop signals: by default it handles only TERM/INT/HUP/QUIT, so SIGUSR1 (the time-limit
# warning) would kill the agent and, with it, the training processes in the middle of a save.
# Handled signals are forwarded to the workers, and the agent waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# for them to save before killing them: 170 fits a 180 s warning (#SBATCH --signal=B:USR1@180, LoRA);
# slurm/sft_70b.sh sets 570 for its 600 s warning. Both variables need torch >= 2.11 (PET_SIGNALS_TO_HANDLE
# since 2.9, the shutdown timeout since 2.11; older torchrun ignores them: agent killed by USR1, 30 s).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-170}"

if [ -f "${XDG_CONFIG_HOME:-$HOME/.config}/sft/env.sh" ]; then
    # shellcheck disable=SC1091
    source "${XDG_CONFIG_HOME:-$HOME/.config}/sft/env.sh"
fi
