"""Mixtures of sources: weights and counts honoured, upsampling announced, eval carved first and never trained on."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from data_helpers import chat, data_config, numbered_chats, write_jsonl

from sft.curation import FilterConfig
from sft.data import SourceConfig, prepare_data
from sft.errors import SFTError
from sft.mixture import mixture_targets
from sft.packing import build_rows, plan_epoch


def sources(tmp_path, sizes: dict, **per_source):
    out = []
    for name, n in sizes.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", numbered_chats(n, prefix=name))
        out.append(SourceConfig(path=str(path), **per_source.get(name, {})))
    return out


def composition(split) -> list[int]:
    return np.bincount(split.column("source"), minlength=2).tolist()


def test_weights_set_the_share_of_each_source(tmp_path, tokenizer, caplog):
    srcs = sources(tmp_path, {"a": 200, "b": 50}, a={"weight": 3.0}, b={"weight": 1.0})
    with caplog.at_level(logging.WARNING, logger="sft.data"):
        data = prepare_data(data_config(tmp_path, sources=srcs), tokenizer, None, None)
    # 250 examples in all (what the weighted sources hold), split 3:1; b is too small and is upsampled.
    assert composition(data.train) == [188, 62]
    assert [s["in_train"] for s in data.manifest["sources"]] == [188, 62]
    assert data.manifest["sources"][1]["upsampled"] and not data.manifest["sources"][0]["upsampled"]
    assert any("b.jsonl" in r.message and "upsampling" in r.message for r in caplog.records)
    copies = Counter(data.train.rows[data.train.column("source") == 1].tolist())
    assert len(copies) == 50 and set(copies.values()) == {1, 2}  # every b example used, none favoured
    a_rows = data.train.rows[data.train.column("source") == 0]
    assert len(set(a_rows.tolist())) == 188  # a is subsampled without repeats


def test_counts_are_exact(tmp_path, tokenizer, caplog):
    srcs = sources(tmp_path, {"a": 100, "b": 40}, a={"count": 30}, b={"count": 100})
    with caplog.at_level(logging.WARNING, logger="sft.data"):
        data = prepare_data(data_config(tmp_path, sources=srcs), tokenizer, None, None)
    assert composition(data.train) == [30, 100]
    b_copies = Counter(data.train.rows[data.train.column("source") == 1].tolist())
    assert sorted(set(b_copies.values())) == [2, 3] and sum(b_copies.values()) == 100
    assert sum("upsampling" in r.message for r in caplog.records) == 1


def test_mixture_size_and_sources_taken_whole(tmp_path, tokenizer):
    srcs = sources(tmp_path, {"a": 80, "b": 80, "c": 20}, a={"weight": 1.0}, b={"weight": 1.0})
    data = prepare_data(data_config(tmp_path, sources=srcs, mixture_size=120), tokenizer, None, None)
    assert np.bincount(data.train.column("source")).tolist() == [50, 50, 20]
    with pytest.raises(SFTError, match="smaller than the 20 examples"):
        mixture_targets(srcs, [80, 80, 20], 10)
    with pytest.raises(SFTError, match="no source has a weight"):
        mixture_targets([SourceConfig(path="x")], [5], 10)


def test_the_epoch_trains_each_mixture_example_as_often_as_it_was_sampled(tmp_path, tokenizer):
    srcs = sources(tmp_path, {"a": 60, "b": 15}, a={"weight": 1.0}, b={"weight": 1.0})
    data = prepare_data(data_config(tmp_path, sources=srcs), tokenizer, None, None)
    lengths = data.train.lengths
    rows = build_rows(lengths, "bfd", 256)
    plan = plan_epoch(rows, lengths, seed=0, epoch=0, global_rows=8, micro_rows=2)
    trained = Counter(int(data.train.rows[d]) for step in plan.steps for slot in step for row in slot for d in row)
    assert trained == Counter(data.train.rows.tolist())  # upsampled copies present, nothing else repeated or lost


def test_eval_is_carved_per_source_before_filters_and_never_trained_on(tmp_path, tokenizer):
    a = numbered_chats(100, prefix="a")
    a += [dict(a[i]) for i in range(0, 100, 5)]  # 20 exact copies inside the source
    write_jsonl(tmp_path / "a.jsonl", a)
    b = write_jsonl(tmp_path / "b.jsonl", numbered_chats(50, prefix="b"))
    srcs = [SourceConfig(path=str(tmp_path / "a.jsonl")), SourceConfig(path=str(b), weight=None)]
    plain = prepare_data(data_config(tmp_path / "1", sources=srcs, eval_fraction=0.1), tokenizer, None, None)
    curated = prepare_data(replace(data_config(tmp_path / "2", sources=srcs, eval_fraction=0.1),
                                   filters=FilterConfig(exact_dedup=True, min_response_tokens=10)), tokenizer, None, None)
    assert plain.eval.rows.tolist() == curated.eval.rows.tolist()  # filters never change the eval set
    assert [s["eval"] for s in plain.manifest["sources"]] == [12, 5]  # 10% of each source
    for data in (plain, curated):
        assert not set(data.train.rows.tolist()) & set(data.eval.rows.tolist())
    # With or without de-duplication, not even a copy of an eval conversation reaches training,
    # and the copies removed are counted.
    text = {i: json.dumps(r["messages"]) for i, r in enumerate(a + numbered_chats(50, prefix="b"))}
    eval_texts = {text[int(r)] for r in plain.eval.rows}
    copies = sum(text[i] in eval_texts for i in range(len(text))) - len(plain.eval)
    assert copies > 0
    for data in (plain, curated):
        assert not any(text[int(r)] in eval_texts for r in data.train.rows)
        assert data.manifest["filters"]["eval_copy"]["count"] == copies


def test_each_source_has_its_own_format_and_system_prompt(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = write_jsonl(tmp_path / "chats.jsonl", [chat("Hi?", "Hello."), chat("Q?", "A.", system="Own system.")])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 2", "output": "4"}]))
    pc = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt": ["Capital of France?"], "completion": ["Paris."]}), pc)
    srcs = [SourceConfig(path=str(chats), format="messages", system_prompt="SYS-CHATS"),
            SourceConfig(path=str(alpaca), format="alpaca", system_prompt="SYS-ALPACA"),
            SourceConfig(path=str(pc), format="prompt_completion")]
    data = prepare_data(data_config(tmp_path, sources=srcs), tokenizer, None, None)
    texts = sorted(tokenizer.decode(data.train.example(i)[0]) for i in range(len(data.train)))
    assert any("SYS-CHATS" in t and "Hello." in t for t in texts)
    assert any("Own system." in t and "SYS-CHATS" not in t for t in texts)  # a conversation's own system prompt wins
    assert any("SYS-ALPACA" in t and "Add\n\n2 and 2" in t for t in texts)
    assert any("Paris." in t and "SYS" not in t for t in texts)
    report = data.manifest["sources"]
    assert [s["format"] for s in report] == ["messages", "alpaca", "prompt_completion"]
    assert [s["in_train"] for s in report] == [2, 1, 1]


def test_per_source_counts_in_the_manifest(tmp_path, tokenizer):
    a = numbered_chats(30, prefix="a") + [chat("x" * 300, "too long")] * 2 + numbered_chats(3, prefix="a")
    write_jsonl(tmp_path / "a.jsonl", a)
    b = write_jsonl(tmp_path / "b.jsonl", numbered_chats(10, prefix="b") + [chat("y" * 300, "long")])
    srcs = [SourceConfig(path=str(tmp_path / "a.jsonl")), SourceConfig(path=str(b), count=20)]
    cfg = replace(data_config(tmp_path, sources=srcs), filters=FilterConfig(exact_dedup=True))
    data = prepare_data(cfg, tokenizer, None, None)
    sa, sb = data.manifest["sources"]
    assert (sa["records"], sa["kept"], sa["dropped"], sa["in_train"]) == (35, 30, {"overlong": 2, "exact_duplicate": 3}, 30)
    assert (sb["records"], sb["kept"], sb["dropped"], sb["in_train"], sb["upsampled"]) == (11, 10, {"overlong": 1}, 20, True)
    assert sa["tokens"] == int(data.train.lengths[data.train.column("source") == 0].sum())
    assert sb["target_tokens"] > 0 and data.manifest["train"]["examples"] == 50
    assert data.manifest["train"]["dropped"] == {"overlong": 3, "exact_duplicate": 3}


def test_weight_and_count_together_are_refused(tmp_path, tokenizer):
    srcs = sources(tmp_path, {"a": 10}, a={"weight": 1.0, "count": 5})
    with pytest.raises(SFTError, match=r"data.sources\[0\]: set weight or count, not both"):
        prepare_data(data_config(tmp_path, sources=srcs), tokenizer, None, None)
