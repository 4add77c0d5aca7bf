"""Small builders for the data tests: JSONL files of hand-made conversations and isolated data configs."""

from __future__ import annotations

import json
from pathlib import Path

from sft.data import DataConfig, SourceConfig


def chat(user: str, answer: str, system: str | None = None, **extra) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs, **extra}


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def numbered_chats(n: int, prefix: str = "q") -> list[dict]:
    """n distinct conversations whose answers name their index (so tests can tell them apart)."""
    return [chat(f"{prefix} question number {i}?", f"Answer {prefix}{i}.") for i in range(n)]


def data_config(tmp_path: Path, path: Path | None = None, sources: list[SourceConfig] | None = None, **kw) -> DataConfig:
    kw.setdefault("eval_fraction", 0.0)
    kw.setdefault("max_length", 256)
    return DataConfig(path=str(path) if path else None, sources=sources or [], cache_dir=str(tmp_path / "cache"), **kw)
