"""Sources -> normalised conversations -> eval split -> token ids + label masks -> curation -> mixture, cached.

`prepare_data` is what training calls: it opens the cache that matches the config, building it
first if there is none (sft/preprocess.py does the work, sft/cache.py the bookkeeping). Every
process may call it: one builds under a file lock while the others wait on the lock, not in a
collective, so a long build never trips a distributed timeout.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from sft import cache
from sft.curation import FilterConfig, validate_filter_config
from sft.errors import SFTError
from sft.mixture import warn_upsampling
from sft.templating import IGNORE_INDEX, resolve_eot_id

log = logging.getLogger("sft.data")


@dataclass
class SourceConfig:
    path: str = "???"
    format: str = "auto"  # auto | messages | prompt_completion | alpaca | text
    weight: Optional[float] = None  # relative share of the training mixture
    count: Optional[int] = None  # exact number of training examples (upsampled if larger than the source)
    system_prompt: Optional[str] = None  # prepended to conversations that have none


@dataclass
class DataConfig:
    name: str = "demo"
    # Shorthand for a single source: `data=jsonl data.path=FILE`.
    path: Optional[str] = None
    format: str = "auto"
    system_prompt: Optional[str] = None
    sources: List[SourceConfig] = field(default_factory=list)
    max_length: int = 256  # tokens per packed row, and the longest example kept
    # Conversations longer than max_length: split (at turn boundaries, each piece led by the system prompt and
    # as much earlier conversation as fits, untrained; see sft/splitting.py) | drop | truncate.
    overlong: str = "split"
    eval_fraction: float = 0.05  # share of each source's records held out, carved before any filtering
    eval_max: int = 256  # most eval examples carved from EACH source (a mixture of k sources holds up to k x eval_max)
    split_seed: int = 0
    mixture_size: Optional[int] = None  # total training examples of a weighted mixture (default: what the weighted sources hold)
    filters: FilterConfig = field(default_factory=FilterConfig)
    cache_dir: str = "${oc.env:SFT_CACHE,'~/.cache/sft'}/data"
    prepared: Optional[str] = None  # a cache directory made by `sft.prepare`: used only if it matches this config
    num_proc: int = 1  # tokenizer worker processes


# Settings that do not change the cache's content (where it lives, how fast it is built).
_NOT_IN_KEY = ("name", "cache_dir", "prepared", "num_proc")


class Split:
    """A tokenised split: rows of a memory-mapped Arrow table (input_ids, target mask, num_tokens, ...).

    `rows` may repeat a row (an upsampled source); nothing is copied into memory but the indices.
    Also accepts a `datasets.Dataset` and a `labels` column instead of `target` (small in-memory
    splits built by tests and tools).
    """

    def __init__(self, table: Any, rows: np.ndarray | None = None):
        if hasattr(table, "flatten_indices"):  # a datasets.Dataset: its pyarrow table, in its row order
            table = (table.flatten_indices() if getattr(table, "_indices", None) is not None else table).data.table
        self.table = table
        self.rows = np.arange(table.num_rows, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self._ids = table.column("input_ids").chunks
        self._labels_given = "target" not in table.column_names
        self._marks = table.column("labels" if self._labels_given else "target").chunks
        self._chunk_start = np.cumsum([0] + [len(c) for c in self._ids])
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            all_lengths = self.table.column("num_tokens").to_numpy().astype(np.int64)
            self._lengths = all_lengths[self.rows]
        return self._lengths

    def column(self, name: str) -> np.ndarray:
        """A per-example column (num_target, source, ...) in split order."""
        return self.table.column(name).to_numpy()[self.rows]

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) as int64, labels IGNORE_INDEX where not trained."""
        row = int(self.rows[int(i)])
        c = int(np.searchsorted(self._chunk_start, row, side="right")) - 1
        k = row - int(self._chunk_start[c])
        ids = self._ids[c][k].values.to_numpy(zero_copy_only=False).astype(np.int64)
        marks = self._marks[c][k].values.to_numpy(zero_copy_only=False)
        if self._labels_given:
            return ids, marks.astype(np.int64)
        return ids, np.where(marks, ids, IGNORE_INDEX)


@dataclass
class PreparedData:
    train: Split
    eval: Split
    manifest: dict
    path: str
    built: bool = False  # this call built the cache (rather than finding it)


def resolved_sources(cfg: DataConfig) -> list[SourceConfig]:
    if cfg.path and cfg.sources:
        raise SFTError("data.path and data.sources are both set; use one (data.path is shorthand for one source)")
    if cfg.path:
        return [SourceConfig(path=cfg.path, format=cfg.format, system_prompt=cfg.system_prompt)]
    if not cfg.sources:
        raise SFTError("no data: set data.path=FILE or data.sources")
    return list(cfg.sources)


def validate_data_config(cfg: DataConfig) -> None:
    if cfg.overlong not in ("split", "drop", "truncate"):
        raise SFTError(f"data.overlong={cfg.overlong!r}: expected split, drop or truncate")
    if cfg.max_length < 8:
        raise SFTError(f"data.max_length={cfg.max_length} is too small to hold any conversation")
    if not 0 <= cfg.eval_fraction < 1:
        raise SFTError(f"data.eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    if cfg.num_proc < 1:
        raise SFTError(f"data.num_proc={cfg.num_proc} must be >= 1")
    if cfg.mixture_size is not None and cfg.mixture_size < 1:
        raise SFTError(f"data.mixture_size={cfg.mixture_size} must be >= 1")
    if cfg.eval_max < 0:
        raise SFTError(f"data.eval_max={cfg.eval_max} must be >= 0")
    if cfg.mixture_size is not None and not any(s.weight is not None for s in resolved_sources(cfg)):
        raise SFTError(f"data.mixture_size={cfg.mixture_size} is set but no data source has a weight to fill it with; "
                       "give some sources a weight, or drop data.mixture_size")
    for i, src in enumerate(resolved_sources(cfg)):
        if src.weight is not None and src.count is not None:
            raise SFTError(f"data.sources[{i}]: set weight or count, not both")
        if src.weight is not None and src.weight <= 0:
            raise SFTError(f"data.sources[{i}].weight must be positive")
        if src.count is not None and src.count < 0:
            raise SFTError(f"data.sources[{i}].count must be >= 0")
    validate_filter_config(cfg.filters)


def _settings(cfg: DataConfig) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    # Source locations are not content: the data's digests stand for them (see cache.source_fingerprint).
    settings["path"] = None
    settings["sources"] = [dict(asdict(s), path=None) for s in resolved_sources(cfg)]
    return settings


def cache_key(cfg: DataConfig, tokenizer, template: str | None, eot_id: int) -> str:
    return cache.key_of(_key_parts(cfg, tokenizer, template, eot_id))


def _key_parts(cfg: DataConfig, tokenizer, template: str | None, eot_id: int) -> dict:
    memo = Path(os.path.expanduser(cfg.cache_dir)) / ".digests"
    effective = template or tokenizer.chat_template or ""
    return cache.key_parts(_settings(cfg), [s.path for s in resolved_sources(cfg)], tokenizer, effective, eot_id, memo)


def prepare_data(cfg: DataConfig, tokenizer, template: str | None, eot_token: str | None) -> PreparedData:
    """Open the cached splits for this config, building them first if no matching cache exists."""
    validate_data_config(cfg)
    eot_id = resolve_eot_id(tokenizer, eot_token)
    parts = _key_parts(cfg, tokenizer, template, eot_id)
    key = cache.key_of(parts)
    if cfg.prepared:
        data = open_prepared(Path(os.path.expanduser(cfg.prepared)), key, parts)
        _announce(data)
        return data
    root = Path(os.path.expanduser(cfg.cache_dir))
    final = root / key
    built = False
    if not cache.is_complete(final):
        with cache.build_lock(root, key) as locked:
            if not cache.is_complete(final):  # the process we waited for may have built it
                cache.remove_stale_builds(root, key, locked)
                build_into(cfg, tokenizer, template, eot_id, final, key, parts)
                built = True
    data = open_prepared(final, key, parts)
    data.built = built
    _announce(data)
    return data


def _announce(data: PreparedData) -> None:
    """What every run on this data must hear, whether the cache was just built or reused."""
    warn_upsampling(data.manifest.get("sources", []))
    copies = data.manifest.get("filters", {}).get("eval_copy", {}).get("count", 0)
    if copies:
        log.warning("%d training examples were copies of eval examples (same text) and were removed from training", copies)


def build_into(cfg: DataConfig, tokenizer, template, eot_id: int, final: Path, key: str, parts: dict) -> None:
    from sft.preprocess import build

    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-build-", dir=final.parent))
    try:
        manifest = build(cfg, resolved_sources(cfg), tokenizer, template, eot_id, tmp, key)
        manifest.update(key=key, key_parts=parts)
        cache.write_manifest(tmp, manifest)  # last: a directory with a manifest is a complete cache
        cache.publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_prepared(directory: Path, key: str, parts: dict) -> PreparedData:
    manifest = cache.read_manifest(directory)
    if manifest.get("key") != key:
        what = cache.explain_mismatch(manifest.get("key_parts", {}), parts)
        raise SFTError(
            f"{directory}: data cache was built for another config (key {manifest.get('key')} != {key}; differs in: "
            f"{what}); prepare it again with this config, or drop data.prepared to build a matching cache"
        )
    table, train_rows, eval_rows = cache.open_tables(directory, manifest)
    return PreparedData(train=Split(table, train_rows), eval=Split(table, eval_rows), manifest=manifest, path=str(directory))
