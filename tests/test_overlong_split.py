"""data.overlong=split (the default): long conversations become several examples, no turn is lost.

Token-exact, with the real Qwen2 tokenizer and its ChatML template: every assistant turn that fits
max_length alone is trained in exactly one piece, with the same tokens as in the whole
conversation; each piece starts with the system prompt and carries as much earlier conversation as
fits, untrained; the one turn too long even alone is the only thing dropped, reported with its
file:line; assistant_tokens {input, trained} account for exactly that turn.
"""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import data_config, write_jsonl

from real_tokenizers import qwen2_tokenizer
from sft.data import prepare_data
from sft.prepare import _assistant_token_lines
from sft.sources import Record
from sft.templating import encode_conversation, resolve_eot_id

MAX = 256
SYSTEM = {"role": "system", "content": "You are a careful assistant who answers in full sentences."}
WORDS = "river stone light paper window garden music number letter silver market winter bridge table".split()


def _text(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + "."


def _long_conversation(system: bool, huge_at: int | None) -> list[dict]:
    msgs = [SYSTEM] if system else []
    for i in range(12):
        msgs.append({"role": "user", "content": f"Question {i}: " + _text(i, 12)})
        msgs.append({"role": "assistant", "content": _text(100 + i, 400 if i == huge_at else 30)})
    return msgs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen2_tokenizer(tmp_path_factory.mktemp("qwen2"), template="chatml")))


def _runs(ids, target):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], target.astype(np.int8), [0]])))
    return [tuple(ids[a:b].tolist()) for a, b in zip(edges[0::2], edges[1::2])]


def _encode(tok, messages):
    ids, target = encode_conversation(Record(messages=tuple(messages), where="-"), tok, resolve_eot_id(tok, None), None)
    return np.asarray(ids), np.asarray(target)


def _rows_of_record(data, record: int):
    table = data.train.table
    rec = table.column("record").to_numpy()
    rows = sorted(int(r) for r in data.train.rows if rec[r] == record)
    return [data.train.example(int(np.flatnonzero(data.train.rows == r)[0])) for r in rows]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_every_turn_that_fits_is_trained_exactly_once(tmp_path, tok, num_proc):
    conversations = [_long_conversation(True, huge_at=5), _long_conversation(False, huge_at=None),
                     [{"role": "user", "content": "short"}, {"role": "assistant", "content": "Short answer."}]]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": m} for m in conversations])
    data = prepare_data(data_config(tmp_path, path, max_length=MAX, num_proc=num_proc), tok, None, None)
    assert data.manifest["max_length"] == MAX

    for record, msgs in enumerate(conversations[:2]):
        full_ids, full_target = _encode(tok, msgs)
        assert len(full_ids) > 2 * MAX  # it had to be split
        want_runs = _runs(full_ids, full_target)
        huge = 5 if record == 0 else None
        if huge is not None:
            assert len(_encode(tok, [SYSTEM] + msgs[1 + 2 * huge : 3 + 2 * huge])[0]) > MAX
            del want_runs[huge]  # the only thing dropped
        pieces = _rows_of_record(data, record)
        assert len(pieces) >= 3
        got_runs = []
        im_start, assistant = tok.convert_tokens_to_ids("<|im_start|>"), tok("assistant")["input_ids"][0]
        system_ids = _encode(tok, [SYSTEM])[0] if record == 0 else None
        start = 1 if record == 0 else 0
        exchanges = [(s, s + 2) for s in range(start, len(msgs), 2)]
        for ids, labels in pieces:
            target = labels != -100
            assert len(ids) <= MAX and target.any()
            if system_ids is not None:  # the system prompt leads every piece
                assert ids[: len(system_ids)].tolist() == system_ids.tolist()
            got_runs += _runs(ids, target)
            # The piece is exactly the template's rendering of system + exchanges c..e-1, the trained ones
            # last, and its context is as long as fits: one more earlier exchange would not fit.
            n_trained = len(_runs(ids, target))
            trained_so_far = len(got_runs)
            e = trained_so_far + (1 if huge is not None and trained_so_far > huge else 0)
            headers = int(np.sum((ids[:-1] == im_start) & (ids[1:] == assistant)))
            c = e - headers
            assert c >= 0 and headers >= n_trained
            head = [SYSTEM] if record == 0 else []
            assert np.array_equal(_encode(tok, head + msgs[exchanges[c][0] : exchanges[e - 1][1]])[0], ids)
            if c > 0:
                assert len(_encode(tok, head + msgs[exchanges[c - 1][0] : exchanges[e - 1][1]])[0]) > MAX
        assert got_runs == want_runs  # each turn once, in order, with the same tokens as in the whole conversation

    m = data.manifest
    assert m["filters"]["overlong"]["count"] == 1
    ex = m["filters"]["overlong"]["examples"][0]
    assert ex["where"].endswith("d.jsonl:1") and "messages[12]" in ex["why"] and f"data.max_length={MAX}" in ex["why"]
    full = [_encode(tok, msgs) for msgs in conversations]
    dropped_turn = _runs(*full[0])[5]
    input_tokens = sum(int(t[1:].sum()) for _, t in full)
    assert m["assistant_tokens"] == {"input": input_tokens, "trained": input_tokens - len(dropped_turn)}
    assert m["sources"][0]["assistant_tokens"] == m["assistant_tokens"]
    line = _assistant_token_lines(m, "split")[0]
    assert f"input {input_tokens:,}, trained {input_tokens - len(dropped_turn):,}" in line


def test_drop_still_drops_whole_conversations_and_says_what_it_cost(tmp_path, tok):
    conversations = [_long_conversation(True, huge_at=None),
                     [{"role": "user", "content": "short"}, {"role": "assistant", "content": "Short answer."}]]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": m} for m in conversations])
    data = prepare_data(data_config(tmp_path, path, max_length=MAX, overlong="drop"), tok, None, None)
    full = [_encode(tok, msgs) for msgs in conversations]
    assert len(data.train) == 1 and data.manifest["filters"]["overlong"]["count"] == 1
    assert data.manifest["assistant_tokens"] == {"input": sum(int(t[1:].sum()) for _, t in full),
                                                 "trained": int(full[1][1][1:].sum())}


def test_raw_text_longer_than_max_length_is_cut_into_chunks(tmp_path, tok):
    text = _text(3, 600)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": "short"}])
    data = prepare_data(data_config(tmp_path, path, max_length=MAX), tok, None, None)
    want = tok(text)["input_ids"] + [tok.eos_token_id]
    rec = data.train.table.column("record").to_numpy()
    chunks = [data.train.example(i)[0].tolist() for i in range(len(data.train)) if rec[data.train.rows[i]] == 0]
    assert all(len(c) <= MAX for c in chunks) and sum(chunks, []) == want
    # The first token of each chunk after the first is no longer predicted: the one cost of cutting raw text.
    a = data.manifest["assistant_tokens"]
    assert a["trained"] == a["input"] - (len(chunks) - 1) and len(chunks) >= 3
