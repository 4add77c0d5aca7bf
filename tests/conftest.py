"""Shared fixtures: the shipped tiny tokenizer, tiny models built from config, composed run configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "sft" / "assets" / "tiny_tokenizer"
FAST_RUN = [
    "model=tiny", "data.eval_max=16", "eval.every=0", "eval.generate=0", "run.demo=false",
    "train.global_batch_size=8", "train.micro_batch_size=4", "optim.warmup_steps=2",
]

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # One data cache per test session: fast (built once) yet never the user's ~/.cache.
    monkeypatch.setenv("SFT_CACHE", str(tmp_path_factory.getbasetemp() / "sft-cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def snapshot(root):
    """Every entry under `root` (directories too: a created empty directory is a change) and every file's hash:
    what a failed start must leave exactly as it was."""
    import hashlib

    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """A run directory with a checkpoint, metrics and a config in it, which no failing command may touch."""
    run = tmp_path_factory.mktemp("existing")
    (run / "checkpoints" / "step-000010").mkdir(parents=True)
    (run / "checkpoints" / "step-000010" / "train_state.json").write_text('{"step": 10}')
    (run / "checkpoints" / "LATEST").write_text("step-000010\n")
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    (run / "config.yaml").write_text("run:\n  name: earlier\n")
    return run


def compose(overrides: list[str]):
    """The run config exactly as `python -m sft.train OVERRIDES` would see it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from sft import config as C

    C.register()
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_object(hydra_compose(config_name="config", overrides=overrides))


def tiny_model(tokenizer, seed: int = 0, **arch):
    from sft.model import build_model

    cfg = compose(["model=tiny"]).model
    cfg.arch.update(arch)
    cfg.init_seed = seed
    return build_model(cfg, tokenizer)


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 600, module: str = "sft.train"):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
