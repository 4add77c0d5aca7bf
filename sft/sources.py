"""Read user data files and normalise every record to a list of chat messages.

Every problem is reported as an SFTError naming the file and line (or row), before any
model or tokenizer work starts, because a bad line found an hour into tokenisation of a
million conversations wastes the hour.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from sft.errors import SFTError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "text")
# The fields each format reads; anything else in a record is refused, because a field the loader does
# not read is data the user expects to be trained on and would silently lose. "id" is the one
# metadata field allowed (dataset dumps carry it; it names a record, it is not content).
FORMAT_FIELDS = {
    "messages": ({"messages"}, {"conversations"}),
    "prompt_completion": ({"prompt", "completion"},),
    "alpaca": ({"instruction", "input", "output"},),
    "text": ({"text"},),
}
METADATA_FIELDS = {"id"}
MESSAGE_FIELDS = ({"role", "content"}, {"from", "value"})
# OpenAI-style structured tool use. Chat templates render it in their own ways, and the assistant's
# tool-call turns would need their own masks; until that is built, such records are refused by name
# rather than trained without their calls.
TOOL_FIELDS = {"tool_calls", "function_call", "tool_call_id", "tools", "functions"}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


@dataclass(frozen=True)
class Record:
    """One normalised example. `text` is set only for raw-text records (trained on every token)."""

    messages: tuple[dict, ...]
    where: str  # "file:line" for error messages and dropped-example reports
    text: str | None = None


def list_data_files(path: str) -> list[Path]:
    """A file, or every data file under a directory (sorted, so the order never depends on the disk)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SFTError(f"{path}: no such file or directory (data.sources[].path)")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
    if not files:
        raise SFTError(f"{path}: directory holds no {'/'.join(DATA_SUFFIXES)} files")
    return files


def _iter_raw(file: Path, progress: Callable[[int], None] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw object) pairs, one record at a time (never the whole file in memory, except
    for .json, whose single top-level list has to be parsed at once). JSONL is read line by line so
    errors carry line numbers; `progress` is told how many bytes were consumed."""
    suffix = file.suffix
    if suffix == ".jsonl":
        with open(file, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if progress:
                    progress(len(line))
                if not line.strip():
                    continue
                try:
                    yield f"{file}:{lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SFTError(f"{file}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                except UnicodeDecodeError:
                    raise SFTError(f"{file}:{lineno}: not valid UTF-8 text") from None
        return
    if progress:
        progress(file.stat().st_size)
    if suffix == ".json":
        try:
            with open(file, encoding="utf-8") as fh:
                obj = json.load(fh)
        except json.JSONDecodeError as exc:
            raise SFTError(f"{file}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        except UnicodeDecodeError:
            raise SFTError(f"{file}: not valid UTF-8 text") from None
        if isinstance(obj, dict) and "data" in obj and isinstance(obj["data"], list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise SFTError(f"{file}: a .json data file must hold a list of records (or {{'data': [...]}})")
        for i, rec in enumerate(obj):
            yield f"{file}[{i}]", rec
    elif suffix in (".parquet", ".arrow"):
        row = 0
        for batch in _arrow_batches(file):
            for rec in batch.to_pylist():
                yield f"{file} row {row}", rec
                row += 1
    else:
        raise SFTError(f"{file}: unsupported data file type {suffix!r} (use {', '.join(DATA_SUFFIXES)})")


def _arrow_batches(file: Path) -> Iterator[Any]:
    """Record batches of a Parquet or Arrow (IPC file or stream) file, one at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.suffix == ".parquet":
            yield from pq.ParquetFile(file).iter_batches(batch_size=1024)
            return
        with pa.memory_map(str(file)) as source:
            try:  # the IPC file format (random access); datasets' own .arrow files are IPC streams
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                batches = pa.ipc.open_stream(source)
            yield from batches
    except (pa.ArrowInvalid, OSError) as exc:
        raise SFTError(f"{file}: cannot be read as {file.suffix[1:]}: {exc}") from None


def detect_format(rec: dict) -> str:
    if "messages" in rec or "conversations" in rec:
        return "messages"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    return ""


def _check_messages(msgs: Any, where: str) -> tuple[dict, ...]:
    if not isinstance(msgs, list) or not msgs:
        raise SFTError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if isinstance(m, dict):
            _check_message_fields(m, i, where)
        if isinstance(m, dict) and "role" not in m and "from" in m and "value" in m:
            # ShareGPT dumps spell turns {"from": "human"|"gpt", "value": ...}.
            m = {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]}
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SFTError(
                f"{where}: messages[{i}] must be an object with 'role' and 'content' (or ShareGPT 'from' and 'value'), "
                f"got {sorted(m) if isinstance(m, dict) else type(m).__name__}"
            )
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise SFTError(f"{where}: messages[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise SFTError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise SFTError(f"{where}: messages[{i}] is an empty assistant turn")
        if not content.isascii():
            _check_unicode(content, f"{where}: messages[{i}].content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise SFTError(f"{where}: conversation has no assistant turn, so nothing would be trained")
    return tuple(out)


def _check_unicode(text: str, where: str) -> None:
    """JSON can spell half of a surrogate pair ("\\ud83d" alone), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SFTError(f"{where}: character {exc.start} is a lone UTF-16 surrogate ({text[exc.start]!r}), not text; "
                       "the file was written from broken UTF-16 (e.g. an emoji cut in half): fix or drop the record") from None


def _tool_refusal(where: str, field: str) -> SFTError:
    return SFTError(f"{where}: {field}: structured (OpenAI-style) tool calls are not supported and would be lost in "
                    "training; write tool calls and results into the messages' content as your model's chat template "
                    "does, or remove these records")


def _present(d: dict) -> set:
    """Fields that hold something: columnar files (Parquet, Arrow) give every row every column, null where unused."""
    return {k for k, v in d.items() if v is not None and v != [] and v != {}}


def _check_message_fields(m: dict, i: int, where: str) -> None:
    allowed = MESSAGE_FIELDS[0] if "role" in m or "content" in m else MESSAGE_FIELDS[1]
    if m.keys() <= allowed:  # the common case, without looking at the (long) values
        return
    extra = _present({k: m[k] for k in m.keys() - allowed})
    tools = sorted(extra & TOOL_FIELDS)
    if tools:
        raise _tool_refusal(where, f"messages[{i}] has {tools[0]!r}")
    if extra:
        raise SFTError(f"{where}: messages[{i}] has unknown field(s) {sorted(extra)} (a message has 'role' and 'content', "
                       "or ShareGPT 'from' and 'value'); remove them or move their text into 'content'")


def _check_record_fields(rec: dict, fmt: str, where: str) -> None:
    present = _present(rec)
    tools = sorted(present & TOOL_FIELDS)
    if tools:
        raise _tool_refusal(where, f"field {tools[0]!r}")
    allowed = next((f for f in FORMAT_FIELDS[fmt] if f & present), FORMAT_FIELDS[fmt][0])
    extra = present - allowed - METADATA_FIELDS
    if extra:
        raise SFTError(f"{where}: unknown field(s) {sorted(extra)} for format {fmt} (it reads "
                       f"{' + '.join(sorted(allowed))}, and 'id'); remove them, or fix their names if they hold data to train on")


def normalise(rec: Any, fmt: str, where: str, system_prompt: str | None = None) -> Record:
    """Turn one raw record of any supported format into a Record of chat messages."""
    if not isinstance(rec, dict):
        raise SFTError(f"{where}: expected a JSON object per record, got {type(rec).__name__}")
    if fmt == "auto":
        fmt = detect_format(rec)
        if not fmt:
            raise SFTError(
                f"{where}: cannot tell the format from fields {sorted(rec)}; expected 'messages', "
                "'prompt'+'completion', 'instruction'+'output' (alpaca) or 'text'"
            )
    if fmt in FORMAT_FIELDS:
        _check_record_fields(rec, fmt, where)
    if fmt == "text":
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            raise SFTError(f"{where}: 'text' must be a non-empty string")
        return Record(messages=(), where=where, text=text)
    if fmt == "messages":
        msgs = _check_messages(rec.get("messages", rec.get("conversations")), where)
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                raise SFTError(f"{where}: field {key!r} must be a string (format prompt_completion)")
        msgs = _check_messages(
            [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}], where
        )
    elif fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise SFTError(f"{where}: field {key!r} must be a string (format alpaca)")
        extra = rec.get("input") or ""
        prompt = rec["instruction"] + (f"\n\n{extra}" if extra else "")
        msgs = _check_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}], where)
    else:
        raise SFTError(f"data format {fmt!r} is not one of {', '.join(FORMATS)}")
    if system_prompt and msgs[0]["role"] != "system":
        msgs = ({"role": "system", "content": system_prompt},) + msgs
    return Record(messages=msgs, where=where)


def iter_source(path: str, fmt: str = "auto", system_prompt: str | None = None,
                progress: Callable[[int], None] | None = None) -> Iterator[Record]:
    """Every record of a local file/directory, or of a hub dataset name, validated, one at a time."""
    if fmt not in FORMATS:
        raise SFTError(f"data format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not os.path.exists(os.path.expanduser(path)) and _looks_like_hub_name(path):
        yield from _iter_hub(path, fmt, system_prompt)
        return
    for file in list_data_files(path):
        if file.stat().st_size == 0:
            raise SFTError(f"{file}: file is empty")
        n = 0
        for where, raw in _iter_raw(file, progress):
            yield normalise(raw, fmt, where, system_prompt)
            n += 1
        if n == 0:
            raise SFTError(f"{file}: file holds no records")


def read_source(path: str, fmt: str = "auto", system_prompt: str | None = None) -> list[Record]:
    """All records of a source as a list (small data and tests; the pipeline streams with iter_source)."""
    return list(iter_source(path, fmt, system_prompt))


def source_size(path: str) -> int:
    """Bytes of a local source (0 for a hub name), for progress bars."""
    if not os.path.exists(os.path.expanduser(path)):
        return 0
    return sum(f.stat().st_size for f in list_data_files(path))


def _looks_like_hub_name(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and Path(path).suffix == ""


def _iter_hub(name: str, fmt: str, system_prompt: str | None) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # the hub raises many types; the user needs the name and the reason
        raise SFTError(f"{name}: not a local path, and loading it from the Hugging Face Hub failed: {exc}") from None
    for i, rec in enumerate(ds):
        yield normalise(rec, fmt, f"{name} row {i}", system_prompt)
