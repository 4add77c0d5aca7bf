"""Build one data cache: read + validate -> carve eval -> tokenise in workers -> curate -> mix -> manifest.

Memory stays flat as the dataset grows: records are streamed from the source files into an Arrow
file, tokenisation reads that file memory-mapped in worker processes and writes Arrow again, and
the main process only ever holds per-example numbers (lengths, flags, hashes) and row indices.
All validation of the input happens in the first, single pass, so a bad line is reported with
its file:line before any tokenisation work starts (and long before any model is built).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from sft import curation, tokenize_pass
from sft.errors import SFTError
from sft.mixture import carve_eval, mix
from sft.sources import Record, iter_source, source_size

log = logging.getLogger("sft.data")
BATCH = 1024  # records per Arrow batch when reading sources


def build(cfg, sources, tokenizer, template, eot_id: int, out: Path, key: str) -> dict:
    """Write the cache's files into `out` and return its manifest (without key, written by the caller)."""
    started = time.time()
    raw_path = out / "raw" / "records.arrow"
    sizes = write_records(sources, raw_path)
    read_s = time.time() - started
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    split = carve_eval(sizes, cfg.eval_fraction, cfg.eval_max, cfg.split_seed, _identities(cfg, sources))
    eval_rows = np.concatenate([ev + offsets[i] for i, (ev, _) in enumerate(split)]).astype(np.int64)
    cand_rows = np.concatenate([tr + offsets[i] for i, (_, tr) in enumerate(split)]).astype(np.int64)

    files = tokenize(raw_path, out, cfg, tokenizer, template, eot_id, key)
    table = _open(out, files)
    cols = {name: table.column(name).to_numpy() for name in
            ("source", "num_tokens", "num_target", "prompt_tokens", "overlong", "truncated", "content_hash",
             "repetition", "cutoff", "refusal", "record", "input_target", "turn")}
    # From here on indices are rows (examples): a record split by data.overlong=split has several.
    eval_rows, cand_rows = _rows_of(cols["record"], eval_rows), _rows_of(cols["record"], cand_rows)
    sketches = _sketches(table, cfg.filters.near_dedup_num_perm) if cfg.filters.near_dedup else None
    decision = curation.decide(cols, cand_rows, eval_rows, cfg.filters, cfg.max_length, sketches)
    kept = [r[decision.reason[r] == curation.KEPT] for r in
            (cand_rows[cols["source"][cand_rows] == i] for i in range(len(sources)))]
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
        examples = _examples(raw, cols, decision, cfg, eval_rows)
    shutil.rmtree(raw_path.parent, ignore_errors=True)
    seconds = time.time() - started
    n_tokens = int(cols["num_tokens"].sum())
    return {
        "format": "sft-data",
        "files": files,
        "max_length": cfg.max_length,
        "sources": _source_report(sources, sizes, offsets, split, cols, decision, mix_report, train_rows, eval_kept),
        "assistant_tokens": _assistant_tokens(cols, decision, cand_rows),
        "train": _split_totals(cols, decision, train_rows, cand_rows),
        "eval": _split_totals(cols, decision, eval_kept, eval_rows),
        "filters": examples,
        "lengths": _length_summary(cols["num_tokens"][train_rows]),
        "build": {"seconds": round(seconds, 2), "read_seconds": round(read_s, 2), "records": int(offsets[-1]),
                  "records_per_s": round(offsets[-1] / max(seconds, 1e-9), 1), "examples": int(len(cols["record"])),
                  "tokens": n_tokens,
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
    """Token ids, trained-token masks and curation features of every record (one row per example),
    written by data.num_proc worker processes; returns the Arrow files (relative to `out`)."""
    return tokenize_pass.run(raw_path, out, cfg, tokenizer, template, eot_id)


def _rows_of(record_of: np.ndarray, records: np.ndarray) -> np.ndarray:
    """The rows (examples) of the given records, record by record in the given order. Rows are in
    record order, and a record's rows are consecutive."""
    records = np.asarray(records, dtype=np.int64)
    lo = np.searchsorted(record_of, records, side="left")
    hi = np.searchsorted(record_of, records, side="right")
    n = hi - lo
    if not n.sum():
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return (starts + np.arange(int(n.sum()))).astype(np.int64)


def _assistant_tokens(cols, decision, cand_rows, source: int | None = None) -> dict:
    """Assistant tokens of the training candidates before any cut or filter (input) and in the kept
    training examples (trained, each once, before the mixture's sampling): what the build lost."""
    rows = cand_rows if source is None else cand_rows[cols["source"][cand_rows] == source]
    kept = rows[decision.reason[rows] == curation.KEPT]
    return {"input": int(cols["input_target"][rows].sum()), "trained": int(cols["num_target"][kept].sum())}


# ---------------------------------------------------------------- reports

def _open(out: Path, files: list[str]):
    import pyarrow as pa

    tables = []
    for f in files:
        with pa.memory_map(str(out / f)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


def _identities(cfg, sources) -> list[str]:
    """Each source's content digest: what seeds its eval carve (see mixture.carve_eval)."""
    from sft import cache

    memo = Path(os.path.expanduser(cfg.cache_dir)) / ".digests"
    return [cache._sha(cache.source_fingerprint(src.path, memo)) for src in sources]


class _SignatureReader:
    """MinHash signature of a row, read from the memory-mapped column (never all of them in memory)."""

    def __init__(self, table, num_perm: int):
        chunks = table.column("minhash").chunks
        self.starts = np.cumsum([0] + [len(c) for c in chunks])
        self.views = [c.flatten().to_numpy().reshape(-1, num_perm) for c in chunks]

    def __call__(self, row: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.views[c][row - self.starts[c]]


class _ShingleReader:
    """A row's set of word n-gram hashes (variable length), read from the memory-mapped column."""

    def __init__(self, table):
        self.chunks = table.column("shingles").chunks
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])

    def __call__(self, row: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.chunks[c][int(row - self.starts[c])].values.to_numpy(zero_copy_only=False)


def _sketches(table, num_perm: int) -> curation.Sketches:
    return curation.Sketches(_SignatureReader(table, num_perm), _ShingleReader(table))


def _source_report(sources, sizes, offsets, split, cols, decision, mix_report, train_rows, eval_kept) -> list[dict]:
    report = []
    src_of_train = cols["source"][train_rows]
    src_of_eval = cols["source"][eval_kept]
    for i, src in enumerate(sources):
        cand = _rows_of(cols["record"], split[i][1] + offsets[i])
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
            "assistant_tokens": _assistant_tokens(cols, decision, cand),
        })
    return report


def _split_totals(cols, decision, rows, candidates) -> dict:
    reasons = decision.reason[candidates]
    dropped = {name: int(n) for name, n in
               zip(curation.FILTERS, np.bincount(reasons[reasons >= 0], minlength=len(curation.FILTERS))) if n}
    # candidates = kept + sum(dropped); examples = rows used (training: after the mixture's sampling).
    return {
        "candidates": int(len(candidates)), "kept": int((reasons == curation.KEPT).sum()),
        "examples": int(len(rows)), "tokens": int(cols["num_tokens"][rows].sum()),
        "target_tokens": int(cols["num_target"][rows].sum()), "truncated": int(cols["truncated"][rows].sum()),
        "dropped": dropped, "dropped_overlong": dropped.get("overlong", 0), "dropped_no_target": dropped.get("no_target", 0),
    }


def _length_summary(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {}
    p = np.percentile(lengths, [50, 90, 99])
    return {"mean": round(float(lengths.mean()), 1), "p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(lengths.max())}


def _examples(raw, cols, decision, cfg, eval_rows) -> dict:
    """Counts (all, and split into eval and training candidates) and the first few examples of every
    filter that dropped (or flagged) anything."""
    f = cfg.filters
    out = {}
    is_eval = np.zeros(len(decision.reason), dtype=bool)
    is_eval[eval_rows] = True
    groups = [(name, np.flatnonzero(decision.reason == code)) for code, name in enumerate(curation.FILTERS)]
    groups.append(("refusal_flagged", np.flatnonzero(decision.flagged)))
    for name, rows in groups:
        if not len(rows):
            continue
        shown = []
        for row in rows[: f.examples].tolist():
            rec = raw.slice(int(cols["record"][row]), 1).to_pylist()[0]
            if name == "overlong" and cols["turn"][row] >= 0:  # one turn of a split conversation: show that turn
                rec = dict(rec, messages=rec["messages"][: int(cols["turn"][row]) + 1])
            shown.append({"where": rec["where"], "why": _why(name, row, cols, decision, cfg, raw), "excerpt": _excerpt(rec, name)})
        n_eval = int(is_eval[rows].sum())
        out[name] = {"count": int(len(rows)), "eval": n_eval, "train": int(len(rows)) - n_eval, "examples": shown}
    return out


def _why(name, row, cols, decision, cfg, raw) -> str:
    f = cfg.filters
    if name == "overlong" and cols["turn"][row] >= 0:
        return (f"assistant turn messages[{cols['turn'][row]}] alone (with the system prompt and its prompt) is "
                f"{cols['num_tokens'][row]} tokens > data.max_length={cfg.max_length}; the rest of the conversation is kept")
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
    where = raw.slice(int(cols["record"][other]), 1).column("where")[0].as_py() if other is not None else "an earlier example"
    if name == "eval_copy":
        return f"same text as eval example {where}"
    return f"{'same text as' if name == 'exact_duplicate' else 'near-duplicate of'} {where}"


def _excerpt(rec: dict, name: str, width: int = 160) -> str:
    text = rec["text"] if rec["text"] is not None else next(
        (m["content"] for m in reversed(rec["messages"]) if m["role"] == "assistant"), "")
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    return "..." + text[-width:] if name == "cutoff" else text[:width] + "..."
