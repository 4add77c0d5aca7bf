"""Atomic, sharded checkpoints and exact resume.

Layout: checkpoints/step-000100/{model and optimizer shards, train_state.json, rng/}, and
checkpoints/LATEST naming the newest complete one. A checkpoint is written under a hidden
name and renamed when every rank has finished, and LATEST is replaced last, so a crash or a
signal at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sft import distributed as D
from sft.errors import SFTError
from sft.rundir import check_free_space, dir_bytes, fmt_bytes, free_bytes

log = logging.getLogger(__name__)


@dataclass
class CheckpointConfig:
    every: int = 100  # optimizer steps between checkpoints (0: only at the end and on preemption)
    keep: int = 2  # newest complete checkpoints kept
    export_shard_gb: float = 5.0  # largest safetensors file of final/


try:  # DCP's exception derives from BaseException, not Exception
    from torch.distributed.checkpoint.api import CheckpointException as _DCPError
except ImportError:  # pragma: no cover - torch builds without distributed
    _DCPError = Exception
_LOAD_SAVE_ERRORS = (Exception, _DCPError)


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
    """run.resume: auto or force (LATEST if any), never, or a checkpoint directory."""
    if resume == "never":
        return None
    if resume in ("auto", "force"):
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / "checkpoints" / "LATEST").exists():
        return latest_checkpoint(path)
    if not (path / "train_state.json").exists():
        raise SFTError(f"run.resume={resume}: not a checkpoint directory (no train_state.json) nor a run directory")
    return path


def _damaged(path: Path, what: str) -> SFTError:
    return SFTError(f"{path}: {what}; this checkpoint is damaged: resume from an earlier one "
                    f"(run.resume=PATH to checkpoints/step-N) or start over with run.resume=never")


def inspect_checkpoint(path: Path) -> dict:
    """Read-only check that a checkpoint is complete, before any model is built; returns its train state.

    Catches what a crash or a full disk leaves (a missing, empty or truncated file): every byte range
    that the DCP metadata says it wrote must be in its file. Flipped bytes inside a file are found
    only when loading, and reported by load_checkpoint."""
    state_file = path / "train_state.json"
    try:
        train_state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise _damaged(state_file, f"unreadable ({exc})") from None
    if not isinstance(train_state, dict) or not isinstance(train_state.get("step"), int):
        raise _damaged(state_file, "holds no step")
    if (path / ".metadata").exists():
        from torch.distributed.checkpoint import FileSystemReader

        try:
            metadata = FileSystemReader(str(path)).read_metadata()
        except Exception as exc:  # noqa: BLE001 - pickle/torch errors of a damaged file: name the file
            raise _damaged(path / ".metadata", f"unreadable ({type(exc).__name__}: {exc})") from None
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            f = path / name
            have = f.stat().st_size if f.exists() else None
            if have is None:
                raise _damaged(f, "missing")
            if have < size:
                raise _damaged(f, f"truncated ({have} of {size} bytes)")
    elif not any(p.is_dir() and any(p.glob("*model_states.pt")) for p in path.iterdir()):
        raise _damaged(path, "holds no model state (neither DCP .metadata nor DeepSpeed model states)")
    return train_state


def checkpoint_bytes(engine) -> int:
    """About what one checkpoint of this run takes on disk, all ranks together: the trainable
    parameters in their dtype plus two fp32 AdamW moments (and an fp32 master copy under DeepSpeed
    with 16-bit parameters). Frozen parameters (LoRA's base) are not saved."""
    total = 0
    for p in (engine.module.parameters() if hasattr(engine, "module") else ()):
        if not p.requires_grad:
            continue
        numel = getattr(p, "ds_numel", None) or p.numel()  # DTensor.numel() is global; ZeRO-3 keeps it in ds_numel
        master = 4 if hasattr(p, "ds_numel") and p.element_size() < 4 else 0
        total += numel * (p.element_size() + 8 + master)
    return total


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


def _space_needed(root: Path, engine) -> int:
    """One more checkpoint: as big as the newest one on disk, else the estimate from the engine."""
    try:
        latest = latest_checkpoint(root.parent)
    except SFTError:
        latest = None
    return dir_bytes(latest) if latest is not None else checkpoint_bytes(engine)


def _agree(error: BaseException | None) -> bool:
    """Collective: True on every rank if any rank failed (so no rank waits alone in a barrier)."""
    return D.all_reduce_sum([0.0 if error is None else 1.0])[0] > 0


def _disk_full(exc: BaseException, root: Path, need: int) -> bool:
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    try:  # torch.save reports a full disk as "unexpected pos ..." without an errno
        return free_bytes(root) < max(need // 20, 1 << 20)
    except OSError:
        return False


def save_checkpoint(run_dir: str, step: int, engine, train_state: dict, keep: int, protect: str | None = None) -> Path:
    """Every rank calls this. Returns the final checkpoint directory. `protect` names a checkpoint
    that pruning must keep beyond the newest `keep` (the best one by eval loss).

    Free space for one checkpoint is checked first (a save that fills the disk is refused, not
    attempted); a write that fails anyway (disk full, quota, permissions) removes the partial
    directory on every path and becomes one SFTError on every rank, with LATEST untouched."""
    root = checkpoint_root(run_dir)
    name = f"step-{step:06d}"
    partial = root / f".partial-{name}"
    final = root / name
    need = _space_needed(root, engine)
    if D.rank() == 0:
        try:
            check_free_space(root, need, f"checkpoint {name}")
            problem = None
        except SFTError as exc:
            problem = str(exc)
    problem = D.broadcast_object(problem if D.rank() == 0 else None)
    if problem:
        raise SFTError(problem + " (the last complete checkpoint, named by checkpoints/LATEST, is intact)")
    error: BaseException | None = None
    try:
        if D.rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
    except (OSError, RuntimeError) as exc:
        error = exc
    if not _agree(error):
        try:
            engine.save_state(partial)
            rng_dir = partial / "rng"
            rng_dir.mkdir(exist_ok=True)
            torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                       rng_dir / f"rank{D.rank()}.pt")
        except _LOAD_SAVE_ERRORS as exc:  # DCP wraps the OSError in a CheckpointException; classified below
            error = exc
        if not _agree(error) and D.rank() == 0:
            try:
                _write_atomic(partial / "train_state.json", json.dumps(train_state, indent=2, sort_keys=True, default=str))
                if final.exists():  # left by an earlier attempt that never became LATEST
                    shutil.rmtree(final)
                os.replace(partial, final)
                _write_atomic(root / "LATEST", name + "\n")
                _fsync_dir(root)  # the renames survive a node crash, not only a killed process
            except (OSError, RuntimeError) as exc:
                error = exc
    if _agree(error):
        _fail_save(error, root, partial, name, need)
    if D.rank() == 0:
        _prune(root, keep, keep_name=name, protect=protect)
    D.barrier()
    return final


def _fail_save(error: BaseException | None, root: Path, partial: Path, name: str, need: int) -> None:
    if D.rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        for tmp in root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    D.barrier()
    if error is None:  # another rank failed; it reports the cause
        raise SFTError(f"{root}: checkpoint {name} could not be written on another rank (see its log); "
                       "the last complete checkpoint, named by checkpoints/LATEST, is intact")
    if _disk_full(error, root, need):
        raise SFTError(f"{root}: disk full while writing checkpoint {name} (needs about {fmt_bytes(need)}); "
                       "free some space and start the same command again: it resumes from checkpoints/LATEST") from None
    if isinstance(error, OSError) or "Permission denied" in str(error) or "Read-only file system" in str(error):
        raise SFTError(f"{root}: cannot write checkpoint {name} ({error}); "
                       "the last complete checkpoint, named by checkpoints/LATEST, is intact") from None
    raise error


def _prune(root: Path, keep: int, keep_name: str, protect: str | None = None) -> None:
    """Remove all but the newest `keep` checkpoints, never the one just written nor `protect`."""
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[: max(0, len(done) - max(1, keep))]:
        if old.name not in (keep_name, protect):
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, engine) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; return the train state (step, epoch, ...).

    A checkpoint that does not fit this model (another shape, another set of trainable tensors) or
    whose bytes are damaged becomes one SFTError naming the checkpoint."""
    train_state = inspect_checkpoint(path)
    try:
        engine.load_state(path)
    except SFTError:
        raise
    except _LOAD_SAVE_ERRORS as exc:  # DCP/DeepSpeed errors carry the tensor name; keep one line of them
        raise SFTError(f"{path}: {_load_problem(exc)}") from None
    engine.scheduler.load_state_dict(train_state["scheduler"])
    rng_file = path / "rng" / f"rank{D.rank()}.pt"
    if rng_file.exists():
        try:
            rng = torch.load(rng_file, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged zip: name the file
            raise _damaged(rng_file, f"unreadable ({type(exc).__name__})") from None
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        log.warning("%s has no RNG state for rank %d (different world size): continuing with a fresh RNG", path, D.rank())
    return train_state


def _load_problem(exc: BaseException) -> str:
    import re

    texts = [str(exc)] + [str(e) for e in getattr(exc, "failures", {}).values()]
    text = "\n".join(texts)
    size = re.search(r"[Ss]ize mismatch[^\n]*", text)
    if size:
        return (f"written for a model of another shape ({size.group(0).strip()}); resume with the model it was trained "
                "with, or start a new run (run.resume=never or another run.output_dir)")
    missing = re.search(r"Missing key in checkpoint state_dict: ([^\s.]+(?:\.[^\s.]+)*)", text)
    if missing:
        return (f"has no tensor {missing.group(1)} for this model (written for another model or peft setting); "
                "resume with the settings it was trained with, or start a new run (run.resume=never)")
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return (f"cannot be loaded ({type(exc).__name__}: {first.strip()[:300]}); the checkpoint is damaged or was written by "
            "another version: resume from an earlier one (run.resume=PATH) or start over with run.resume=never")
