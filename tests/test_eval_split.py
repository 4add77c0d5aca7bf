"""The eval split: never trained on (not even a copy), the same for a source alone or in a mixture,
capped per source; and the numbers and warnings printed about it."""

from __future__ import annotations

import logging
import random
import re

import numpy as np
import pytest
from data_helpers import chat, data_config, numbered_chats, write_jsonl

from conftest import compose
from sft.data import SourceConfig, prepare_data
from sft.errors import SFTError


def _norm(messages) -> str:
    return "\n".join(f"{m['role']}:{' '.join(m['content'].split())}" for m in messages)


def _eval_locals(data, source: int, offset: int) -> list[int]:
    """The eval rows of one source as record numbers within that source, in eval order."""
    return [int(r) - offset for r, s in zip(data.eval.rows, data.eval.column("source")) if s == source]


def test_a_sources_eval_examples_do_not_depend_on_the_other_sources(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", numbered_chats(120, prefix="a"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered_chats(70, prefix="b"))
    alone = prepare_data(data_config(tmp_path / "1", a, eval_fraction=0.1), tokenizer, None, None)
    mixed = prepare_data(data_config(tmp_path / "2", sources=[SourceConfig(path=str(b)), SourceConfig(path=str(a))],
                                     eval_fraction=0.1), tokenizer, None, None)
    assert len(alone.eval) == 12
    assert _eval_locals(mixed, 1, 70) == _eval_locals(alone, 0, 0)  # same examples, same order, at position 1
    # Moving the file does not move its eval split either (the carve follows the content, like the cache key).
    moved = write_jsonl(tmp_path / "elsewhere" / "a.jsonl", numbered_chats(120, prefix="a"))
    again = prepare_data(data_config(tmp_path / "3", moved, eval_fraction=0.1), tokenizer, None, None)
    assert _eval_locals(again, 0, 0) == _eval_locals(alone, 0, 0)


def test_eval_max_caps_each_source(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", numbered_chats(100, prefix="a"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered_chats(40, prefix="b"))
    data = prepare_data(data_config(tmp_path, sources=[SourceConfig(path=str(a)), SourceConfig(path=str(b))],
                                    eval_fraction=0.25, eval_max=7), tokenizer, None, None)
    assert [s["eval_carved"] for s in data.manifest["sources"]] == [7, 7]
    assert np.bincount(data.eval.column("source")).tolist() == [7, 7] and len(data.eval) == 14
    with pytest.raises(SFTError, match="data.eval_max=-1"):
        prepare_data(data_config(tmp_path, a, eval_max=-1), tokenizer, None, None)


def test_no_eval_example_is_trained_on_whatever_the_filters(tmp_path, tokenizer, capsys, caplog):
    """A file where most conversations occur several times (some with other spacing): with the default
    filters (de-duplication off) no eval conversation reaches training, and the removed copies are counted."""
    rng = random.Random(0)
    base = numbered_chats(60)
    records = []
    for i in range(300):
        r = base[rng.randrange(60)]
        if rng.random() < 0.3:  # the same text to a reader: only the spacing differs
            r = chat(r["messages"][0]["content"].replace(" ", "  "), " " + r["messages"][1]["content"] + "\n")
        records.append(r)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = compose(["data=jsonl", f"data.path={path}", "data.max_length=256", "data.eval_fraction=0.1",
                   f"data.cache_dir={tmp_path / 'cache'}", "train.global_batch_size=8", "train.micro_batch_size=4"])
    from sft.prepare import run

    run(cfg, world=1)
    out = capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="sft.data"):
        data = prepare_data(cfg.data, tokenizer, None, None)  # the cache again: reused, and still reported
    assert not data.built
    text = [_norm(r["messages"]) for r in records]
    eval_texts = {text[int(r)] for r in data.eval.rows}
    assert len(data.eval) == 30 and not any(text[int(r)] in eval_texts for r in data.train.rows)
    copies = sum(t in eval_texts for t in text) - len(data.eval)
    assert copies > 30  # most eval conversations had training copies
    assert data.manifest["filters"]["eval_copy"]["count"] == copies
    assert f"eval_copy: {copies} training copies of eval examples removed" in out
    assert any(f"{copies} training examples were copies of eval examples" in r.message for r in caplog.records)
    assert len(data.train) == 300 - 30 - copies


def test_printed_counts_add_up_with_eval_and_training_apart(tmp_path, tokenizer, capsys):
    long = chat("x" * 400, "too long for a row")
    records = numbered_chats(80) + [long] * 20 + numbered_chats(10)  # overlong ones land in eval and in training
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = compose(["data=jsonl", f"data.path={path}", "data.max_length=128", "data.eval_fraction=0.25",
                   "data.filters.exact_dedup=true", f"data.cache_dir={tmp_path / 'cache'}",
                   "train.global_batch_size=8", "train.micro_batch_size=4"])
    from sft.prepare import run

    run(cfg, world=1)
    out = capsys.readouterr().out
    data = prepare_data(cfg.data, tokenizer, None, None)
    m = data.manifest
    src = m["sources"][0]
    row = next(line for line in out.splitlines() if line.split() and line.split()[0].endswith("d.jsonl"))
    records_n, ev, ev_drop, dropped, kept, in_train = [int(x.replace(",", "")) for x in row.split()[1:7]]
    assert records_n == 110 == ev + ev_drop + dropped + kept
    assert (ev, ev_drop, dropped, kept, in_train) == (src["eval"], src["eval_carved"] - src["eval"],
                                                      sum(src["dropped"].values()), src["kept"], src["in_train"])
    f = m["filters"]["overlong"]
    assert f["count"] == 20 == f["eval"] + f["train"] and f["eval"] == ev_drop > 0
    assert f"overlong: 20 dropped ({f['train']} training, {f['eval']} eval)" in out
    assert m["train"]["candidates"] == m["train"]["kept"] + sum(m["train"]["dropped"].values())
    assert m["eval"]["candidates"] == m["eval"]["kept"] + sum(m["eval"]["dropped"].values())
    assert re.search(rf"^train\s+{kept}\s+examples", out, re.M) and re.search(rf"^eval\s+{ev}\s+examples", out, re.M)


def test_mixture_size_without_a_weighted_source_is_refused_before_reading_data(tmp_path, tokenizer):
    missing = tmp_path / "not-there.jsonl"  # never opened: the config is wrong before the data matters
    with pytest.raises(SFTError, match="data.mixture_size=10 is set but no data source has a weight"):
        prepare_data(data_config(tmp_path, missing, mixture_size=10), tokenizer, None, None)
    srcs = [SourceConfig(path=str(missing), count=5), SourceConfig(path=str(missing))]
    with pytest.raises(SFTError, match="no data source has a weight"):
        prepare_data(data_config(tmp_path, sources=srcs, mixture_size=10), tokenizer, None, None)


def test_upsampling_is_announced_on_every_use_of_the_cache(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_chats(10))
    cfg = data_config(tmp_path, sources=[SourceConfig(path=str(path), count=25)])
    for attempt in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sft.data"):
            data = prepare_data(cfg, tokenizer, None, None)
        assert data.built == (attempt == 0)
        warnings = [r.message for r in caplog.records if "upsampling" in r.message]
        assert len(warnings) == 1 and "25 training examples requested, 10 available" in warnings[0]
