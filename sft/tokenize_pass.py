"""Pass 2 of a data build: token ids, trained-token masks and curation features, in worker processes.

Each worker takes contiguous shards of the raw records (memory-mapped Arrow), encodes them a
batch at a time with `BatchEncoder` (one tokenizer call per batch), and writes one Arrow stream
file per shard; shard files in order are the token table, so rows keep the records' order.

Why not `datasets.map`: with num_proc > 1 it pickles the function's arguments -- a 151k-token
tokenizer -- for every worker and shard, and with a 151k vocabulary that cost more than the
tokenisation itself (2,000 conversations: 16 s with 2 workers against 6 s with 1). Forked workers
inherit the tokenizer instead (nothing is pickled but shard bounds and file names).

Rows are examples, not records: with data.overlong=split one record may give several rows (its
pieces, see sft/splitting.py), so every row names its record (`record`), and the record's
assistant tokens before any cut (`input_target`) are stored on its first row only, for the
manifest's `assistant_tokens: {input, trained}`.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sft import curation
from sft.batch_encode import BatchEncoder
from sft.sources import Record
from sft.splitting import split_conversation

ROWS_PER_CALL = 256  # conversations per batched tokenizer call: big enough to amortise, small enough for memory

# Arrow types of the columns (names of pyarrow type factories); curation features not named here
# are typed by Arrow from their values.
TYPES = {
    "source": "int32", "record": "int64", "num_tokens": "int32", "num_target": "int32", "prompt_tokens": "int32",
    "overlong": "bool_", "truncated": "bool_", "input_target": "int32", "turn": "int32", "content_hash": "int64",
    "repetition": "float32", "cutoff": "bool_", "refusal": "bool_",
}
LIST_TYPES = {"input_ids": ("int32", np.int32), "target": ("bool_", np.bool_), "minhash": ("uint32", np.uint32),
              "shingles": ("uint32", np.uint32)}


@dataclass
class _Job:
    raw_path: str
    out_dir: str
    encoder: BatchEncoder
    tokenizer: object
    max_length: int
    overlong: str
    filters: object


_JOB: _Job | None = None  # set before the workers fork: they inherit it, nothing big is pickled


def run(raw_path: Path, out: Path, cfg, tokenizer, template, eot_id: int) -> list[str]:
    """Tokenise every raw record into Arrow files under out/tokens; returns their paths relative to `out`."""
    global _JOB
    import pyarrow as pa
    from tqdm.auto import tqdm

    with pa.memory_map(str(raw_path)) as source:
        n = pa.ipc.open_stream(source).read_all().num_rows
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    workers = cfg.num_proc if cfg.num_proc > 1 and n > ROWS_PER_CALL else 1
    # A few shards per worker so that a slow shard (long conversations) does not leave a core idle.
    n_shards = max(1, min(-(-n // ROWS_PER_CALL), 4 * workers))
    bounds = np.linspace(0, n, n_shards + 1).astype(np.int64)
    shards = [(i, int(bounds[i]), int(bounds[i + 1])) for i in range(n_shards)]
    # One worker: the tokenizer's batched calls could use Rust threads, but the workers are the
    # parallelism (data.num_proc): keep one core per worker so the setting means what it says.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _JOB = _Job(str(raw_path), str(out), BatchEncoder(tokenizer, eot_id, template), tokenizer, cfg.max_length,
                cfg.overlong, cfg.filters)
    files = []
    try:
        with tqdm(total=n, unit=" conversations", desc="tokenizing", mininterval=1.0) as bar:
            if workers == 1:
                results = map(_work, shards)
                files = [_tick(r, bar) for r in results]
            else:
                with mp.get_context("fork").Pool(workers) as pool:
                    files = [_tick(r, bar) for r in pool.imap(_work, shards)]
    finally:
        _JOB = None
    return files


def _tick(result, bar) -> str:
    name, n = result
    bar.update(n)
    return name


def _work(shard) -> tuple[str, int]:
    import pyarrow as pa

    index, lo, hi = shard
    job = _JOB
    name = f"tokens/part-{index:05d}.arrow"
    with pa.memory_map(job.raw_path) as source:
        raw = pa.ipc.open_stream(source).read_all()
        writer = None
        with pa.OSFile(str(Path(job.out_dir) / name), "wb") as sink:
            for start in range(lo, hi, ROWS_PER_CALL):
                part = raw.slice(start, min(ROWS_PER_CALL, hi - start))
                batch = _to_arrow(encode_rows(part.to_pydict(), start, job))
                if writer is None:
                    writer = pa.ipc.new_stream(sink, batch.schema)
                writer.write_batch(batch)
            if writer is None:  # an empty shard still needs a schema: encode nothing, write an empty stream
                writer = pa.ipc.new_stream(sink, _to_arrow(encode_rows({"source": [], "where": [], "messages": [], "text": []},
                                                                      lo, job)).schema)
            writer.close()
    return name, hi - lo


@functools.lru_cache(maxsize=4)
def _refusal_re(patterns: tuple, mode: str):
    return curation.refusal_regex(curation.FilterConfig(refusals=mode, refusal_patterns=list(patterns)))


def encode_rows(batch: dict, first_record: int, job: _Job) -> dict:
    """Columns of the examples made from a batch of raw records (one row per example)."""
    filters, max_length, mode = job.filters, job.max_length, job.overlong
    refusal_re = _refusal_re(tuple(filters.refusal_patterns), filters.refusals)
    records = [Record(messages=tuple(m or ()), where=w, text=t) for w, m, t in zip(batch["where"], batch["messages"], batch["text"])]
    encoded = job.encoder.encode(records)
    out: dict[str, list] = {k: [] for k in ("source", "record", "input_ids", "target", "num_tokens", "num_target",
                                              "prompt_tokens", "overlong", "truncated", "input_target", "turn")}

    def add(src, rec, ids, target, *, length=None, dropped=False, truncated=False, first=False, input_target=0,
            turn=-1, features=None):
        out["source"].append(src)
        out["record"].append(rec)
        out["input_ids"].append(ids)
        out["target"].append(target)
        out["num_tokens"].append(len(ids) if length is None else length)
        out["num_target"].append(int(target[1:].sum()))  # the first token is never predicted
        out["prompt_tokens"].append(int(len(target) - target.sum()))
        out["overlong"].append(dropped)
        out["truncated"].append(truncated)
        out["input_target"].append(input_target if first else 0)
        out["turn"].append(turn)
        for name, value in features.items():
            out.setdefault(name, []).append(value)

    for k, (rec, (ids, target), src) in enumerate(zip(records, encoded, batch["source"])):
        row = first_record + k
        n = len(ids)
        input_target = int(target[1:].sum())
        if n <= max_length or mode in ("drop", "truncate"):
            too_long = n > max_length
            if too_long and mode == "truncate":
                ids, target = ids[:max_length], target[:max_length]
            dropped = too_long and mode == "drop"
            feats = curation.example_features(rec.messages, rec.text, filters, refusal_re)
            # A dropped example keeps its counts and features but no tokens: the cache never stores what
            # training never reads. Its num_target still counts what it would have trained.
            add(src, row, ids[:0] if dropped else ids, target[:0] if dropped else target, length=n if dropped else None,
                dropped=dropped, truncated=too_long and not dropped, first=True, input_target=input_target, features=feats)
            if dropped:
                out["num_target"][-1] = input_target
            continue
        if rec.text is not None:  # raw text has no turns: consecutive chunks of max_length, all trained
            for i, lo in enumerate(range(0, n, max_length)):
                chunk = ids[lo : lo + max_length]
                feats = curation.example_features((), job.tokenizer.decode(chunk.tolist()), filters, refusal_re)
                add(src, row, chunk, target[lo : lo + max_length], first=i == 0, input_target=input_target, features=feats)
            continue
        pieces = split_conversation(list(rec.messages), ids, target, functools.partial(_encode_one, job, rec.where),
                                    max_length)
        if not pieces:  # no assistant turn to cut at (validation should have refused it): dropped whole, counted
            feats = curation.example_features(rec.messages, None, filters, refusal_re)
            add(src, row, ids[:0], target[:0], length=n, dropped=True, first=True, input_target=input_target, features=feats)
            continue
        for i, p in enumerate(pieces):
            feats = curation.example_features(tuple(p.own), None, filters, refusal_re)
            add(src, row, p.ids, p.target, length=p.length if p.dropped else None, dropped=p.dropped, first=i == 0,
                input_target=input_target, turn=p.turn, features=feats)
            if p.dropped:
                out["num_target"][-1] = 0
    return out


def _encode_one(job: _Job, where: str, messages: list) -> tuple[np.ndarray, np.ndarray]:
    return job.encoder.encode_messages(messages, where)


def _to_arrow(cols: dict):
    import pyarrow as pa

    arrays, names = [], []
    for name, values in cols.items():
        if name in LIST_TYPES:
            factory, dtype = LIST_TYPES[name]
            lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat = np.concatenate([np.asarray(v, dtype=dtype) for v in values]) if values else np.zeros(0, dtype)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, getattr(pa, factory)())))
        else:
            arrays.append(pa.array(values, getattr(pa, TYPES[name])() if name in TYPES else None))
        names.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=names)
