"""A start in two halves: everything that can fail is checked first, and only then is the run directory written.

`check_start` runs before any model is built: the run lock's holder, a writable run directory, the
checkpoint to resume (complete on disk), the trajectory (config and data) it was trained with, and
free disk space for the next checkpoint. `begin_run` runs once the model is built and the
checkpoint loaded: it takes the run lock, and only then creates the run directory, writes
config.yaml (with its history in configs/<step>.yaml) and opens the rank logs. A start that fails
anywhere before `begin_run` has written nothing.

Rank 0 alone looks at the filesystem; its verdict is broadcast, so every rank fails (or goes on)
together and none waits alone in a collective.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sft import config as C
from sft import distributed as D
from sft.checkpoint import checkpoint_bytes, inspect_checkpoint, resolve_resume
from sft.errors import SFTError
from sft.rundir import RunLock, check_free_space, check_writable, config_at, dir_bytes, keep_created_dirs, write_config

log = logging.getLogger("sft")


@dataclass
class Resume:
    path: Path | None = None  # checkpoint to continue from
    state: dict | None = None  # its train_state.json
    forced: list[str] = field(default_factory=list)  # trajectory changes accepted by run.resume=force


def on_rank0(fn, *args):
    """Run fn on rank 0 only; every rank returns its result or raises its SFTError."""
    result, error = None, None
    if D.rank() == 0:
        try:
            result = fn(*args)
        except SFTError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - the other ranks must not wait forever for rank 0
            error = f"{type(exc).__name__}: {exc}"
    result, error = D.broadcast_object((result, error))
    if error is not None:
        raise SFTError(error)
    return result


def check_start(cfg: C.SFTConfig, run_dir: Path, data_key: str) -> Resume:
    """Every check that needs no model, on rank 0; writes nothing."""
    return on_rank0(_check_start, cfg, run_dir, data_key)


def _check_start(cfg: C.SFTConfig, run_dir: Path, data_key: str) -> Resume:
    refusal = RunLock(run_dir).refusal()
    if refusal:
        raise SFTError(refusal)
    check_writable(run_dir)
    path = resolve_resume(str(run_dir), cfg.run.resume)
    if path is None:
        need = estimated_checkpoint_bytes(cfg)
        if need:
            check_free_space(run_dir, need, "one checkpoint")
        return Resume()
    state = inspect_checkpoint(path)
    changes = trajectory_changes(cfg, path, state, data_key)
    if changes and cfg.run.resume != "force":
        raise SFTError(
            f"{path}: resuming with another trajectory: {'; '.join(changes)}. Use the settings it was trained with, "
            "run.resume=force to continue anyway (recorded in metrics.jsonl), or run.resume=never / another "
            "run.output_dir to start over")
    check_free_space(run_dir, dir_bytes(path), "the next checkpoint")
    return Resume(path, state, changes)


def estimated_checkpoint_bytes(cfg: C.SFTConfig) -> int | None:
    """One checkpoint of a new run, before any model exists: the trainable tensors of the meta-device
    skeleton (no memory, no GPU; the one `sft.plan` sizes) in their dtype, plus two fp32 AdamW moments.
    None if the skeleton cannot be built here: the model build then reports why, and begin_run checks
    the space again from the real model."""
    try:
        from sft.memory import build_architecture

        arch = build_architecture(cfg)
        return sum(p.numel * (torch.empty((), dtype=p.dtype, device="meta").element_size() + 8)
                   for p in arch.params if p.trainable)
    except Exception:  # noqa: BLE001 - an estimate only; every failure here has a clearer report later
        return None


def trajectory_changes(cfg: C.SFTConfig, path: Path, state: dict, data_key: str) -> list[str]:
    """`key: old -> new` for each trajectory setting that differs from what the checkpoint was trained with.

    The old settings come from the config history of the checkpoint's run (configs/<step>.yaml, the
    config each start of that run used). The data is compared by content (its cache key), so a moved
    file is no change, and edited file contents are one even when no path changed."""
    now = C.trajectory(cfg)
    run_of_ckpt = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    old_file = config_at(run_of_ckpt, int(state["step"]))
    if old_file is not None:
        before = C.trajectory(OmegaConf.to_container(OmegaConf.load(old_file), resolve=False))
        changes = C.trajectory_diff(before, now)
    elif state.get("config_hash") not in (None, C.config_hash(cfg)):
        changes = [f"config hash {state['config_hash']} -> {C.config_hash(cfg)} (no config.yaml beside the checkpoint "
                   "to name the keys)"]
    else:
        changes = []
    saved_key = state.get("data_key")
    data_changed = saved_key is not None and saved_key != data_key
    if not data_changed:  # same content: only where the files are (data.path, sources[i].path) may differ
        changes = [c for c in changes if not c.startswith("data.")]
    elif not any(c.startswith("data.") for c in changes):
        changes.append(f"data: the files' content changed (data cache key {saved_key} -> {data_key})")
    return changes


def begin_run(cfg: C.SFTConfig, run_dir: Path, engine, resume: Resume, step: int) -> None:
    """The run starts: lock, run directory, config.yaml and its history, a record of forced changes.
    Rank 0 holds the lock until release_lock()."""
    on_rank0(_begin_run, cfg, run_dir, engine if D.rank() == 0 else None, resume, step)
    keep_created_dirs()  # the run directory is the run's now, on every rank


def _begin_run(cfg: C.SFTConfig, run_dir: Path, engine, resume: Resume, step: int) -> None:
    if resume.path is None:
        check_free_space(run_dir, checkpoint_bytes(engine), "one checkpoint")
    lock = RunLock(run_dir)
    lock.acquire()
    if lock.took_over:
        log.warning("took over the run lock of %s pid %s, which is no longer running", lock.took_over.get("host"),
                    lock.took_over.get("pid"))
    write_config(run_dir, OmegaConf.to_yaml(OmegaConf.create(C.redact(C.plain_dict(cfg)))), step)
    if resume.forced:
        event = {"step": step, "event": "resume_forced", "checkpoint": str(resume.path), "changed": resume.forced}
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\n")
        log.warning("run.resume=force: continuing %s with %s", resume.path, "; ".join(resume.forced))
    _HELD.append(lock)


_HELD: list[RunLock] = []


def release_lock() -> None:
    while _HELD:
        _HELD.pop().release()


_REASONS = {"overlong": "over data.max_length", "no_target": "with no trained token", "prompt_length": "by prompt length",
            "response_length": "by response length", "repetition": "as repetitive", "cutoff": "as cut off",
            "refusal": "as refusals", "exact_duplicate": "as exact duplicates", "near_duplicate": "as near-duplicates"}


def describe_splits(data) -> str:
    """'44 train / 3 eval examples; dropped 241 over data.max_length, 12 from eval ...', from the data manifest."""
    manifest = data.manifest
    parts = [f"{len(data.train)} train / {len(data.eval)} eval examples"]
    for split in ("train", "eval"):
        totals = manifest.get(split) or {}
        dropped = {k: int(v) for k, v in (totals.get("dropped") or {}).items() if v}
        if dropped:
            what = ", ".join(f"{n} {_REASONS.get(k, k)}" for k, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
            parts.append(f"dropped from {split}: {what}")
        if totals.get("truncated"):
            parts.append(f"{totals['truncated']} {split} examples truncated to data.max_length")
    if len(data.eval) == 0:
        parts.append("no eval examples, so no evaluation (data.eval_fraction / data.eval_max)")
    return "; ".join(parts) + " (details: manifest.json in the data cache)"
