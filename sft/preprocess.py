"""Build one data cache: read + validate -> carve eval -> tokenise in workers -> curate -> mix -> manifest.

Memory stays flat as the dataset grows: records are streamed from the source files into an Arrow
file, tokenisation reads that file memory-mapped in worker processes and writes Arrow again, and
the main process only ever holds per-example numbers (lengths, flags, hashes) and row indices.
All validation of the input happens in the first, single pass, so a bad line is reported with
its file:line before any tokenisation work starts (and long before any model is built).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from sft import curation
from sft.errors import SFTError
from sft.mixture import carve_eval, mix
from sft.sources import Record, iter_source, source_size
from sft.templating import encode_conversation

log = logging.getLogger("sft.data")
BATCH = 1024  # records per Arrow batch when reading sources
MAP_BATCH = 64  # conversations per tokenisation call: small, so a worker's memory does not grow with length


def build(cfg, sources, tokenizer, template, eot_id: int, out: Path, key: str) -> dict:
    """Write the cache's files into `out` and return its manifest (without key, written by the caller)."""
    started = time.time()
    raw_path = out / "raw" / "records.arrow"
    sizes = write_records(sources, raw_path)
    read_s = time.time() - started
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    split = carve_eval(sizes, cfg.eval_fraction, cfg.eval_max, cfg.split_seed)
    eval_rows = np.concatenate([ev + offsets[i] for i, (ev, _) in enumerate(split)]).astype(np.int64)
    cand_rows = np.concatenate([tr + offsets[i] for i, (_, tr) in enumerate(split)]).astype(np.int64)

    files = tokenize(raw_path, out, cfg, tokenizer, template, eot_id, key)
    table = _open(out, files)
    cols = {name: table.column(name).to_numpy() for name in
            ("source", "num_tokens", "num_target", "prompt_tokens", "overlong", "truncated", "content_hash",
             "repetition", "cutoff", "refusal")}
    signature = _SignatureReader(table, cfg.filters.near_dedup_num_perm) if cfg.filters.near_dedup else None
    decision = curation.decide(cols, cand_rows, eval_rows, cfg.filters, cfg.max_length, signature)
    kept = [r[decision.reason[r] == curation.KEPT] for r in
            (cand_rows[(cand_rows >= offsets[i]) & (cand_rows < offsets[i + 1])] for i in range(len(sources)))]
    if sum(len(k) for k in kept) == 0:
        counts = np.bincount(decision.reason[cand_rows] + 1, minlength=len(curation.FILTERS) + 1)[1:]
        why = ", ".join(f"{n} {name}" for name, n in zip(curation.FILTERS, counts.tolist()) if n)
        raise SFTError(f"no training example survives preprocessing (data.max_length={cfg.max_length}): dropped {why}")
    train_rows, mix_report = mix(sources, kept, cfg.mixture_size, cfg.split_seed)
    eval_kept = eval_rows[decision.reason[eval_rows] == curation.KEPT]
    np.save(out / "train.npy", train_rows)
    np.save(out / "eval.npy", eval_kept)

    import pyarrow as pa

    with pa.memory_map(str(raw_path)) as source:
        raw = pa.ipc.open_stream(source).read_all()
        examples = _examples(raw, cols, decision, cfg)
    shutil.rmtree(raw_path.parent, ignore_errors=True)
    seconds = time.time() - started
    n_tokens = int(cols["num_tokens"].sum())
    return {
        "format": "sft-data",
        "files": files,
        "max_length": cfg.max_length,
        "sources": _source_report(sources, sizes, offsets, split, cols, decision, mix_report, train_rows, eval_kept),
        "train": _split_totals(cols, decision, train_rows, cand_rows),
        "eval": _split_totals(cols, decision, eval_kept, eval_rows),
        "filters": examples,
        "lengths": _length_summary(cols["num_tokens"][train_rows]),
        "build": {"seconds": round(seconds, 2), "read_seconds": round(read_s, 2), "records": int(offsets[-1]),
                  "records_per_s": round(offsets[-1] / max(seconds, 1e-9), 1), "tokens": n_tokens,
                  "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1), "num_proc": cfg.num_proc},
    }


# ---------------------------------------------------------------- pass 1: read and validate

RAW_COLUMNS = ("source", "where", "messages", "text")


def write_records(sources, path: Path) -> list[int]:
    """Stream every source's validated records into one Arrow file; returns the record count per source."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    schema = pa.schema([
        ("source", pa.int32()), ("where", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))), ("text", pa.string()),
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = []
    total = sum(source_size(s.path) for s in sources)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            tqdm(total=total or None, unit="B", unit_scale=True, desc="reading data", mininterval=1.0) as bar:
        for i, src in enumerate(sources):
            batch: list[Record] = []
            n = 0
            for rec in iter_source(src.path, src.format, src.system_prompt, progress=bar.update):
                batch.append(rec)
                if len(batch) == BATCH:
                    writer.write_batch(_to_batch(batch, i, schema))
                    n += len(batch)
                    batch = []
            if batch:
                writer.write_batch(_to_batch(batch, i, schema))
                n += len(batch)
            sizes.append(n)
    return sizes


def _to_batch(records: list[Record], source: int, schema):
    import pyarrow as pa

    return pa.RecordBatch.from_pydict({
        "source": [source] * len(records),
        "where": [r.where for r in records],
        "messages": [list(r.messages) for r in records],
        "text": [r.text for r in records],
    }, schema=schema)


# ---------------------------------------------------------------- pass 2: tokenise in workers

def tokenize(raw_path: Path, out: Path, cfg, tokenizer, template, eot_id: int, key: str) -> list[str]:
    """Token ids, trained-token masks and curation features of every record, written by data.num_proc
    worker processes; returns the Arrow files (relative to `out`)."""
    import datasets

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    seq = getattr(datasets, "List", None) or datasets.Sequence  # List since datasets 4
    features = {
        "source": datasets.Value("int32"),
        "input_ids": seq(datasets.Value("int32")), "target": seq(datasets.Value("bool")),
        "num_tokens": datasets.Value("int32"), "num_target": datasets.Value("int32"),
        "prompt_tokens": datasets.Value("int32"), "overlong": datasets.Value("bool"), "truncated": datasets.Value("bool"),
        "content_hash": datasets.Value("int64"), "repetition": datasets.Value("float32"),
        "cutoff": datasets.Value("bool"), "refusal": datasets.Value("bool"),
    }
    if cfg.filters.near_dedup:
        features["minhash"] = seq(datasets.Value("uint32"))
    raw = datasets.Dataset.from_file(str(raw_path))
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    tokens = raw.map(
        _encode_batch, batched=True, batch_size=MAP_BATCH, writer_batch_size=256,
        num_proc=cfg.num_proc if cfg.num_proc > 1 and len(raw) > MAP_BATCH else None,
        remove_columns=["where", "messages", "text"], features=datasets.Features(features),
        fn_kwargs={"tokenizer": tokenizer, "eot_id": eot_id, "template": template, "max_length": cfg.max_length,
                   "overlong": cfg.overlong, "filters": cfg.filters},
        cache_file_name=str(out / "tokens" / "tokens.arrow"), load_from_cache_file=False,
        new_fingerprint=f"sft-{key}", desc="tokenizing",
    )
    return [str(Path(f["filename"]).relative_to(out)) for f in tokens.cache_files]


@functools.lru_cache(maxsize=4)
def _refusal_re(patterns: tuple, mode: str):
    return curation.refusal_regex(curation.FilterConfig(refusals=mode, refusal_patterns=list(patterns)))


def _encode_batch(batch: dict, tokenizer, eot_id, template, max_length, overlong, filters) -> dict:
    """One worker call: a few conversations in, their columns out. Examples dropped for length keep
    their counts and features but no tokens, so the cache does not store what training never reads."""
    out = {k: [] for k in ("input_ids", "target", "num_tokens", "num_target", "prompt_tokens", "overlong", "truncated",
                           "content_hash", "repetition", "cutoff", "refusal")}
    if filters.near_dedup:
        out["minhash"] = []
    refusal_re = _refusal_re(tuple(filters.refusal_patterns), filters.refusals)
    for where, messages, text in zip(batch["where"], batch["messages"], batch["text"]):
        rec = Record(messages=tuple(messages or ()), where=where, text=text)
        ids, target = encode_conversation(rec, tokenizer, eot_id, template)
        n = len(ids)
        too_long = n > max_length
        if too_long and overlong == "truncate":
            ids, target = ids[:max_length], target[:max_length]
        dropped = too_long and overlong == "drop"
        out["num_tokens"].append(n if dropped else len(ids))
        out["num_target"].append(int(target[1:].sum()))  # the first token is never predicted
        out["prompt_tokens"].append(int(len(target) - target.sum()))
        out["overlong"].append(dropped)
        out["truncated"].append(too_long and not dropped)
        out["input_ids"].append(ids[:0] if dropped else ids)
        out["target"].append(target[:0] if dropped else target)
        for name, value in curation.example_features(rec.messages, text, filters, refusal_re).items():
            out[name].append(value)
    return out


# ---------------------------------------------------------------- reports

def _open(out: Path, files: list[str]):
    import pyarrow as pa

    tables = []
    for f in files:
        with pa.memory_map(str(out / f)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


class _SignatureReader:
    """MinHash signature of a row, read from the memory-mapped column (never all of them in memory)."""

    def __init__(self, table, num_perm: int):
        chunks = table.column("minhash").chunks
        self.starts = np.cumsum([0] + [len(c) for c in chunks])
        self.views = [c.flatten().to_numpy().reshape(-1, num_perm) for c in chunks]

    def __call__(self, row: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.views[c][row - self.starts[c]]


def _source_report(sources, sizes, offsets, split, cols, decision, mix_report, train_rows, eval_kept) -> list[dict]:
    report = []
    src_of_train = cols["source"][train_rows]
    src_of_eval = cols["source"][eval_kept]
    for i, src in enumerate(sources):
        cand = split[i][1] + offsets[i]
        reasons = decision.reason[cand]
        dropped = {name: int(n) for name, n in
                   zip(curation.FILTERS, np.bincount(reasons[reasons >= 0], minlength=len(curation.FILTERS))) if n}
        mine = train_rows[src_of_train == i]
        report.append({
            "path": src.path, "format": src.format, "weight": src.weight, "count": src.count,
            "records": int(sizes[i]), "eval": int((src_of_eval == i).sum()), "eval_carved": int(len(split[i][0])),
            "train_candidates": int(len(cand)), "kept": int((reasons == curation.KEPT).sum()), "dropped": dropped,
            "flagged_refusals": int(decision.flagged[cand].sum()),
            "truncated": int(cols["truncated"][cand][reasons == curation.KEPT].sum()),
            **mix_report[i],
            "tokens": int(cols["num_tokens"][mine].sum()), "target_tokens": int(cols["num_target"][mine].sum()),
        })
    return report


def _split_totals(cols, decision, rows, candidates) -> dict:
    reasons = decision.reason[candidates]
    dropped = {name: int(n) for name, n in
               zip(curation.FILTERS, np.bincount(reasons[reasons >= 0], minlength=len(curation.FILTERS))) if n}
    return {
        "examples": int(len(rows)), "kept": int(len(rows)), "tokens": int(cols["num_tokens"][rows].sum()),
        "target_tokens": int(cols["num_target"][rows].sum()), "truncated": int(cols["truncated"][rows].sum()),
        "dropped": dropped, "dropped_overlong": dropped.get("overlong", 0), "dropped_no_target": dropped.get("no_target", 0),
    }


def _length_summary(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {}
    p = np.percentile(lengths, [50, 90, 99])
    return {"mean": round(float(lengths.mean()), 1), "p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(lengths.max())}


def _examples(raw, cols, decision, cfg) -> dict:
    """Counts and the first few examples of every filter that dropped (or flagged) anything."""
    f = cfg.filters
    out = {}
    groups = [(name, np.flatnonzero(decision.reason == code)) for code, name in enumerate(curation.FILTERS)]
    groups.append(("refusal_flagged", np.flatnonzero(decision.flagged)))
    for name, rows in groups:
        if not len(rows):
            continue
        shown = []
        for row in rows[: f.examples].tolist():
            rec = raw.slice(row, 1).to_pylist()[0]
            shown.append({"where": rec["where"], "why": _why(name, row, cols, decision, cfg, raw), "excerpt": _excerpt(rec, name)})
        out[name] = {"count": int(len(rows)), "examples": shown}
    return out


def _why(name, row, cols, decision, cfg, raw) -> str:
    f = cfg.filters
    if name == "overlong":
        return f"{cols['num_tokens'][row]} tokens > data.max_length={cfg.max_length}"
    if name == "no_target":
        return "no trained token left" + (" after truncation" if cols["truncated"][row] else "")
    if name == "prompt_length":
        return f"prompt of {cols['prompt_tokens'][row]} tokens outside [{f.min_prompt_tokens}, {f.max_prompt_tokens or cfg.max_length}]"
    if name == "response_length":
        return f"response of {cols['num_target'][row]} tokens outside [{f.min_response_tokens}, {f.max_response_tokens or cfg.max_length}]"
    if name == "repetition":
        return f"{cols['repetition'][row]:.2f} of its word {f.repetition_ngram}-grams are repeats (> {f.max_repetition})"
    if name == "cutoff":
        return "the last answer stops mid-sentence or inside a code block"
    if name in ("refusal", "refusal_flagged"):
        return "an answer matches data.filters.refusal_patterns"
    other = decision.duplicate_of.get(row)
    where = raw.slice(other, 1).column("where")[0].as_py() if other is not None else "an earlier example"
    return f"{'same text as' if name == 'exact_duplicate' else 'near-duplicate of'} {where}"


def _excerpt(rec: dict, name: str, width: int = 160) -> str:
    text = rec["text"] if rec["text"] is not None else next(
        (m["content"] for m in reversed(rec["messages"]) if m["role"] == "assistant"), "")
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    return "..." + text[-width:] if name == "cutoff" else text[:width] + "..."
