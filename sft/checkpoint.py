"""Atomic, sharded checkpoints and exact resume.

Layout: checkpoints/step-000100/{model and optimizer shards, train_state.json, rng/}, and
checkpoints/LATEST naming the newest complete one. A checkpoint is written under a hidden
name and renamed when every rank has finished, and LATEST is replaced last, so a crash or a
signal at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sft import distributed as D
from sft.errors import SFTError

log = logging.getLogger(__name__)


@dataclass
class CheckpointConfig:
    every: int = 100  # optimizer steps between checkpoints (0: only at the end and on preemption)
    keep: int = 2  # newest complete checkpoints kept
    export_shard_gb: float = 5.0  # largest safetensors file of final/


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / "LATEST"
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / "train_state.json").exists():
        raise SFTError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def resolve_resume(run_dir: str, resume: str) -> Path | None:
    """run.resume: auto (LATEST if any), never, or a checkpoint directory."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / "checkpoints" / "LATEST").exists():
        return latest_checkpoint(path)
    if not (path / "train_state.json").exists():
        raise SFTError(f"run.resume={resume}: not a checkpoint directory (no train_state.json) nor a run directory")
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with open(tmp) as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str, step: int, engine, train_state: dict, keep: int) -> Path:
    """Every rank calls this. Returns the final checkpoint directory."""
    root = checkpoint_root(run_dir)
    name = f"step-{step:06d}"
    partial = root / f".partial-{name}"
    final = root / name
    if D.rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    D.barrier()
    engine.save_state(partial)
    rng_dir = partial / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               rng_dir / f"rank{D.rank()}.pt")
    D.barrier()
    if D.rank() == 0:
        _write_atomic(partial / "train_state.json", json.dumps(train_state, indent=2, sort_keys=True, default=str))
        if final.exists():  # left by an earlier attempt that never became LATEST
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(root / "LATEST", name + "\n")
        _fsync_dir(root)  # the renames survive a node crash, not only a killed process
        _prune(root, keep, keep_name=name)
    D.barrier()
    return final


def _prune(root: Path, keep: int, keep_name: str) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[: max(0, len(done) - max(1, keep))]:
        if old.name != keep_name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, engine) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; return the train state (step, epoch, ...)."""
    train_state = json.loads((path / "train_state.json").read_text())
    engine.load_state(path)
    engine.scheduler.load_state_dict(train_state["scheduler"])
    rng_file = path / "rng" / f"rank{D.rank()}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        log.warning("%s has no RNG state for rank %d (different world size): continuing with a fresh RNG", path, D.rank())
    return train_state
