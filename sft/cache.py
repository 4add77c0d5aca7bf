"""The content-addressed data cache: its key, the build lock, atomic publication, and opening it.

A cache directory is named by a hash of everything that decides its content: the bytes of every
source file, the tokenizer, the chat template, the end-of-turn token and every preprocessing
setting. It is built in a temporary directory beside it and renamed into place only once
complete, so readers never see half a cache; a file lock makes concurrent builders (ranks, nodes,
Slurm array tasks) wait for the first instead of repeating its work. The rename alone keeps the
cache valid on file systems without working locks: the second finished build is discarded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from sft.errors import SFTError
from sft.sources import list_data_files

log = logging.getLogger("sft.data")
CACHE_FORMAT = 3  # bump when the on-disk layout, the masking rules or the eval split change
MANIFEST = "manifest.json"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes, remembered per (path, inode, size, mtime) so that a cache hit on a
    multi-GB dataset does not re-read it on every rank of every run."""
    st = path.stat()
    memo = None
    if memo_dir is not None:
        memo = memo_dir / _sha([str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns])[:32]
        with contextlib.suppress(OSError):
            return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        with contextlib.suppress(OSError):
            memo_dir.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, memo)
    return digest


def source_fingerprint(path: str, memo_dir: Path | None) -> list:
    """Names (relative to the source) and digests of its files; a hub name stands for itself (its revision
    is the user's business). The source's own location is left out, so moving the data keeps the cache."""
    p = Path(os.path.expanduser(path))
    if not p.exists():
        return [path]
    return [[str(f.relative_to(p)) if p.is_dir() else f.name, file_digest(f, memo_dir)] for f in list_data_files(path)]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a pure-Python tokenizer: its vocabulary is what decides the ids
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def key_parts(settings: dict, source_paths: list[str], tokenizer, template: str, eot_id: int, memo_dir: Path | None) -> dict:
    return {
        "format": CACHE_FORMAT,
        "data": _sha([source_fingerprint(p, memo_dir) for p in source_paths]),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": _sha([template, eot_id]),
        "settings": _sha(settings),
    }


def key_of(parts: dict) -> str:
    return _sha(parts)[:20]


def explain_mismatch(found: dict, expected: dict) -> str:
    names = {"format": "cache format version", "data": "source data", "tokenizer": "tokenizer",
             "template": "chat template or end-of-turn token", "settings": "data preprocessing settings"}
    diff = [names[k] for k in names if found.get(k) != expected.get(k)]
    return ", ".join(diff) if diff else "unknown parts"


# ---------------------------------------------------------------- lock and publication

@contextlib.contextmanager
def build_lock(root: Path, key: str):
    """Exclusive lock for building `key`; yields whether the lock is real. Waiting is a plain blocking
    flock, never a collective, so the other ranks of a job can wait for as long as the build takes."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".{key}.lock"
    with open(path, "a+") as fh:
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                log.info("waiting for %s to finish building data cache %s", holder, root / key)
                fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("%s does not support file locks: concurrent builders may repeat the work (the result stays valid)", root)
            yield False
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        try:
            yield True
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_complete(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def remove_stale_builds(root: Path, key: str, locked: bool) -> None:
    """Temporary directories left by builders that died. With the lock held no live builder of this
    key can exist; without working locks, only directories untouched for an hour are removed."""
    for tmp in root.glob(f".{key}-build-*"):
        with contextlib.suppress(OSError):
            if locked or time.time() - tmp.stat().st_mtime > 3600:
                shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, directory / MANIFEST)


def publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place. If another builder got there first (no working lock), keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not is_complete(final):
            raise
        log.info("data cache %s was built concurrently by another process; using that one", final)


# ---------------------------------------------------------------- reading

def read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise SFTError(f"{directory}: not a prepared data cache (no {MANIFEST}); run `python -m sft.prepare` with the same config") from None
    except json.JSONDecodeError as exc:
        raise SFTError(f"{directory / MANIFEST}: damaged ({exc.msg}); delete the directory to rebuild it") from None


def open_tables(directory: Path, manifest: dict):
    """The token table (memory-mapped: ranks share the page cache) and the train/eval row indices."""
    import pyarrow as pa

    tables = []
    for name in manifest["files"]:
        try:
            with pa.memory_map(str(directory / name)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except (OSError, pa.ArrowInvalid) as exc:
            raise SFTError(f"{directory / name}: data cache file missing or damaged ({exc}); delete {directory} to rebuild") from None
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return table, np.load(directory / "train.npy"), np.load(directory / "eval.npy")
