"""Sources -> normalised conversations -> eval split -> token ids + label masks, cached on disk.

The tokenised splits are Arrow tables under a directory named by a hash of everything that
decides their content (source bytes, tokenizer files, chat template, every setting here), so a
cache can be reused by any later run and a stale one can never be picked up by mistake. The
table is memory-mapped: ranks share the page cache instead of each holding a copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from sft.errors import SFTError
from sft.sources import Record, list_data_files, read_source
from sft.templating import IGNORE_INDEX, resolve_eot_id, tokenize_conversation

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when the on-disk layout or masking rules change


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
    overlong: str = "drop"  # drop | truncate examples longer than max_length
    eval_fraction: float = 0.05  # carved from each source before any filtering
    eval_max: int = 256
    split_seed: int = 0
    cache_dir: str = "${oc.env:SFT_CACHE,'~/.cache/sft'}/data"
    num_proc: int = 1


@dataclass
class Split:
    """A tokenised split: a memory-mapped Arrow table with input_ids, labels, num_tokens, num_target."""

    table: Any

    def __len__(self) -> int:
        return len(self.table)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.table["num_tokens"], dtype=np.int64)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.table[int(i)]
        return np.asarray(row["input_ids"], dtype=np.int64), np.asarray(row["labels"], dtype=np.int64)


@dataclass
class PreparedData:
    train: Split
    eval: Split
    manifest: dict
    path: str


def resolved_sources(cfg: DataConfig) -> list[SourceConfig]:
    if cfg.path and cfg.sources:
        raise SFTError("data.path and data.sources are both set; use one (data.path is shorthand for one source)")
    if cfg.path:
        return [SourceConfig(path=cfg.path, format=cfg.format, system_prompt=cfg.system_prompt)]
    if not cfg.sources:
        raise SFTError("no data: set data.path=FILE or data.sources")
    return list(cfg.sources)


def validate_data_config(cfg: DataConfig) -> None:
    if cfg.overlong not in ("drop", "truncate"):
        raise SFTError(f"data.overlong={cfg.overlong!r}: expected drop or truncate")
    if cfg.max_length < 8:
        raise SFTError(f"data.max_length={cfg.max_length} is too small to hold any conversation")
    if not 0 <= cfg.eval_fraction < 1:
        raise SFTError(f"data.eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    for i, src in enumerate(resolved_sources(cfg)):
        if src.weight is not None and src.count is not None:
            raise SFTError(f"data.sources[{i}]: set weight or count, not both")
        if src.weight is not None and src.weight <= 0:
            raise SFTError(f"data.sources[{i}].weight must be positive")


# ---------------------------------------------------------------- cache key

def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_fingerprint(src: SourceConfig) -> list:
    if not os.path.exists(os.path.expanduser(src.path)):
        return [src.path]  # a hub name: its revision is the user's business
    return [[str(f), _file_digest(f)] for f in list_data_files(src.path)]


def _tokenizer_fingerprint(tokenizer, template: str | None) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else b"")
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True).encode())
    h.update((template or tokenizer.chat_template or "").encode())
    return h.hexdigest()


def cache_key(cfg: DataConfig, tokenizer, template: str | None, eot_id: int) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("name", "cache_dir", "num_proc")}
    payload = {
        "format": CACHE_FORMAT,
        "settings": settings,
        "sources": [_source_fingerprint(s) for s in resolved_sources(cfg)],
        "tokenizer": _tokenizer_fingerprint(tokenizer, template),
        "eot_id": eot_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------- build

def _split_and_mix(cfg: DataConfig, per_source: list[list[Record]]) -> tuple[list[Record], list[Record], list[dict]]:
    """Eval carved per source first (so no filter or upsampling can leak an eval example into training)."""
    rng = np.random.default_rng(cfg.split_seed)
    train, evals, report = [], [], []
    sources = resolved_sources(cfg)
    sizes = [len(r) for r in per_source]
    total_weight = sum(s.weight for s in sources if s.weight is not None)
    for src, records, n in zip(sources, per_source, sizes):
        order = rng.permutation(n)
        n_eval = min(cfg.eval_max, int(round(cfg.eval_fraction * n))) if n > 1 else 0
        ev = [records[i] for i in order[:n_eval]]
        tr = [records[i] for i in order[n_eval:]]
        want = len(tr)
        if src.count is not None:
            want = src.count
        elif src.weight is not None:
            want = int(round(src.weight / total_weight * (sum(sizes))))
        if want > len(tr):
            log.warning("source %s: %d examples requested, %d available: upsampling", src.path, want, len(tr))
        if tr and want != len(tr):
            reps = np.concatenate([rng.permutation(len(tr)) for _ in range(want // len(tr) + 1)])[:want]
            tr = [tr[i] for i in reps]
        train += tr
        evals += ev
        report.append({"path": src.path, "records": n, "eval": len(ev), "train_requested": len(tr)})
    return train, evals, report


def _tokenize_all(records: list[Record], tokenizer, eot_id, template, cfg: DataConfig, report: dict) -> dict:
    cols = {"input_ids": [], "labels": [], "num_tokens": [], "num_target": []}
    for rec in records:
        ids, labels = tokenize_conversation(rec, tokenizer, eot_id, template)
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop":
                report["dropped_overlong"] += 1
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            report["truncated"] += 1
        n_target = sum(1 for x in labels[1:] if x != IGNORE_INDEX)  # the first token is never predicted
        if n_target == 0:
            report["dropped_no_target"] += 1
            continue
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["num_tokens"].append(len(ids))
        cols["num_target"].append(n_target)
        report["kept"] += 1
        report["tokens"] += len(ids)
        report["target_tokens"] += n_target
    return cols


def _build(cfg: DataConfig, tokenizer, template, eot_id, out_dir: Path) -> dict:
    import datasets

    per_source = [read_source(s.path, s.format, s.system_prompt) for s in resolved_sources(cfg)]
    train_recs, eval_recs, source_report = _split_and_mix(cfg, per_source)
    manifest = {"sources": source_report, "max_length": cfg.max_length}
    for name, recs in (("train", train_recs), ("eval", eval_recs)):
        counts = dict(kept=0, truncated=0, dropped_overlong=0, dropped_no_target=0, tokens=0, target_tokens=0)
        cols = _tokenize_all(recs, tokenizer, eot_id, template, cfg, counts)
        manifest[name] = counts
        features = datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "num_tokens": datasets.Value("int32"),
            "num_target": datasets.Value("int32"),
        })
        datasets.Dataset.from_dict(cols, features=features).save_to_disk(str(out_dir / name))
    if manifest["train"]["kept"] == 0:
        c = manifest["train"]
        raise SFTError(
            f"no training example survives preprocessing: {c['dropped_overlong']} longer than "
            f"data.max_length={cfg.max_length}, {c['dropped_no_target']} with no trained token left"
        )
    return manifest


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_data(cfg: DataConfig, tokenizer, template: str | None, eot_token: str | None) -> PreparedData:
    """Load the cached splits for this config, building them first if no matching cache exists.

    Concurrent builders (several ranks or jobs) serialise on a file lock; the build is written
    to a temporary directory and renamed into place, so a reader never sees a half-built cache.
    """
    import datasets

    validate_data_config(cfg)
    eot_id = resolve_eot_id(tokenizer, eot_token)
    key = cache_key(cfg, tokenizer, template, eot_id)
    root = Path(os.path.expanduser(cfg.cache_dir))
    final = root / key
    with _file_lock(root / f".{key}.lock"):
        if not (final / "manifest.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
            try:
                manifest = _build(cfg, tokenizer, template, eot_id, tmp)
                manifest["key"] = key
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((final / "manifest.json").read_text())
    if manifest.get("key") != key:
        raise SFTError(f"{final}: data cache was built for another config (key {manifest.get('key')} != {key})")
    return PreparedData(
        train=Split(datasets.load_from_disk(str(final / "train"))),
        eval=Split(datasets.load_from_disk(str(final / "eval"))),
        manifest=manifest,
        path=str(final),
    )
