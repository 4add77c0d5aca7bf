#!/usr/bin/env bash
# Create ./.venv (once) and install sft with its tested versions and the CPU build of torch.
# Installing torch first, pinned, keeps pip from resolving a multi-GB CUDA build for the
# other packages; set SFT_TORCH to choose another build (e.g. on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SFT_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
fi
"$venv/bin/pip" install --quiet "${SFT_TORCH:-torch==2.13.0}"
"$venv/bin/pip" install --quiet -c launch/requirements-pinned.txt -e ".[test,bench]"
echo "environment ready: $venv"
