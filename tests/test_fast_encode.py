"""The batched encoder (sft/batch_encode.py) equals the reference path token for token.

Real tokenizers (Qwen2 151k BPE, Llama-3 128k BPE, Mistral sentencepiece) and their chat templates,
with and without {% generation %} markers (without them, assistant spans come from rendered
prefixes), on a few hundred generated multi-turn conversations plus hand-made edge cases.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from conftest import REPO
from real_tokenizers import BUILDERS
from sft.batch_encode import BatchEncoder
from sft.errors import SFTError
from sft.sources import Record
from sft.templating import encode_conversation, resolve_eot_id

sys.path.insert(0, str(REPO))
from bench.chatdata import make_conversations  # noqa: E402

EDGE_CASES = [
    [{"role": "user", "content": "  leading and trailing spaces  "}, {"role": "assistant", "content": "\n\nnewlines first\n"}],
    [{"role": "system", "content": "Sys."}, {"role": "user", "content": "literal <|im_end|> and <|eot_id|> and </s> in text"},
     {"role": "assistant", "content": "ok <|im_start|>user"}],
    [{"role": "user", "content": "中文，日本語、한국어 and émojis 🙂"}, {"role": "assistant", "content": "ça marche — 好的"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "trailing user turn"}],
    [{"role": "user", "content": "code"}, {"role": "assistant", "content": "```python\nfor i in range(3):\n\tprint(i)\n```"}],
]


def _strip_markers(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


@pytest.fixture(scope="module")
def conversations():
    return make_conversations(300, seed=7, long_every=0)


@pytest.mark.parametrize("family, n", [("qwen2", 300), ("llama3", 100), ("mistral", 100)])
@pytest.mark.parametrize("markers", [True, False], ids=["generation", "prefix-diff"])
def test_batched_encoder_equals_reference_token_for_token(tmp_path_factory, conversations, family, n, markers):
    from transformers import AutoTokenizer

    template_name = {"qwen2": "chatml", "llama3": "llama3", "mistral": "mistral"}[family]
    tok = AutoTokenizer.from_pretrained(str(BUILDERS[family](tmp_path_factory.mktemp(family), template=template_name)))
    if not markers:
        tok.chat_template = _strip_markers(tok.chat_template)
    assert ("generation" in tok.chat_template.replace("add_generation_prompt", "")) == markers
    eot = resolve_eot_id(tok, None)
    records = [Record(messages=tuple(m), where=f"gen:{i}") for i, m in enumerate(conversations[:n] + EDGE_CASES)]
    encoder = BatchEncoder(tok, eot, None)
    fast = []
    for i in range(0, len(records), 64):
        fast += encoder.encode(records[i : i + 64])
    assert encoder.fast  # the fast path itself was compared, not the reference path against itself
    # tiktoken takes the byte-level BPEs (Qwen2, Llama-3); sentencepiece-style Mistral stays on tokenizers.
    assert (encoder.bpe is not None) == (family in ("qwen2", "llama3"))
    for rec, (ids, target) in zip(records, fast):
        want_ids, want_target = encode_conversation(rec, tok, eot, None)
        assert np.array_equal(ids, want_ids), rec.where
        assert np.array_equal(target, want_target), rec.where
        assert ids.dtype == np.int32 and target.dtype == bool
    assert sum(int(t.sum()) for _, t in fast) > 0.4 * sum(len(i) for i, _ in fast)  # real multi-turn answers were trained


def test_raw_text_records_batch_like_the_reference(tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILDERS["llama3"](tmp_path_factory.mktemp("l3"), template="llama3")))
    eot = resolve_eot_id(tok, None)
    records = [Record(messages=(), where="t:1", text="plain text, bos added"),
               Record(messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}), where="t:2"),
               Record(messages=(), where="t:3", text="second text")]
    for rec, (ids, target) in zip(records, BatchEncoder(tok, eot, None).encode(records)):
        want = encode_conversation(rec, tok, eot, None)
        assert np.array_equal(ids, want[0]) and np.array_equal(target, want[1])


def test_a_template_that_rewrites_history_falls_back_and_is_refused_with_its_line(tmp_path_factory):
    """The fast prefix checks fail, the record goes to the reference path, which names file:line."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILDERS["qwen2"](tmp_path_factory.mktemp("q"), template="chatml")))
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    eot = resolve_eot_id(tok, None)
    ok = Record(messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}), where="f.jsonl:1")
    bad = Record(messages=ok.messages + ({"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}),
                 where="f.jsonl:2")
    encoder = BatchEncoder(tok, eot, None)
    got = encoder.encode([ok])[0]  # one assistant turn: nothing to rewrite, the fast path holds
    assert encoder.fast and np.array_equal(got[1], encode_conversation(ok, tok, eot, None)[1])
    with pytest.raises(SFTError, match=r"f\.jsonl:2: the chat template renders earlier turns differently"):
        encoder.encode([ok, bad])


def test_a_fast_path_that_disagrees_is_switched_off(tmp_path_factory, monkeypatch):
    """The first conversation is encoded both ways; a difference means the reference path from then on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILDERS["qwen2"](tmp_path_factory.mktemp("q2"), template="chatml")))
    eot = resolve_eot_id(tok, None)
    encoder = BatchEncoder(tok, eot, None)
    real = encoder._encode_chats
    monkeypatch.setattr(encoder, "_encode_chats", lambda recs: [(i, ~t) for i, t in real(recs)])  # a broken fast path
    rec = Record(messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}), where="f:1")
    ids, target = encoder.encode([rec])[0]
    assert not encoder.fast
    want = encode_conversation(rec, tok, eot, None)
    assert np.array_equal(ids, want[0]) and np.array_equal(target, want[1])


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_tiktoken_offsets_equal_tokenizers_at_every_character(tmp_path_factory, family):
    """Ids, and the offsets the masks read (char_to_token at every character, token_to_chars at every token),
    on text with multi-byte characters split over byte tokens, emoji sequences and added tokens inside text."""
    from transformers import AutoTokenizer

    from sft.fast_bpe import PROBE, FastBPE

    tok = AutoTokenizer.from_pretrained(str(BUILDERS[family](tmp_path_factory.mktemp(family))))
    bpe = FastBPE.from_tokenizer(tok)
    assert bpe is not None
    specials = "".join(f" a{t}b" for t in tok.all_special_tokens)
    for text in (PROBE + specials, "".join(m["content"] for c in make_conversations(20, seed=3) for m in c)):
        got, want = bpe.encode(text), tok.backend_tokenizer.encode(text, add_special_tokens=False)
        assert list(got.ids) == want.ids
        assert [got.char_to_token(p) for p in range(len(text))] == [want.char_to_token(p) for p in range(len(text))]
        assert [got.token_to_chars(t) for t in range(len(want.ids))] == [tuple(want.token_to_chars(t)) for t in range(len(want.ids))]


def test_text_that_nfc_would_change_goes_to_tokenizers(tmp_path_factory):
    """Qwen2 normalises to NFC: a decomposed accent is tokenised by tokenizers (offsets into the text as written),
    in the same batch as texts tiktoken takes; the result equals the reference path."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILDERS["qwen2"](tmp_path_factory.mktemp("q"), template="chatml")))
    eot = resolve_eot_id(tok, None)
    encoder = BatchEncoder(tok, eot, None)
    assert encoder.bpe is not None and encoder.bpe.nfc
    decomposed = "cafe\u0301 nai\u0308ve"  # NFC composes these into é and ï
    records = [Record(messages=({"role": "user", "content": q}, {"role": "assistant", "content": a}), where=f"f:{i}")
               for i, (q, a) in enumerate([("plain", "answer"), (decomposed, "ok " + decomposed), ("x", "y")])]
    assert not encoder.bpe.handles(decomposed)
    for rec, (ids, target) in zip(records, encoder.encode(records)):
        want = encode_conversation(rec, tok, eot, None)
        assert np.array_equal(ids, want[0]) and np.array_equal(target, want[1]), rec.where


def test_tokenizers_that_tiktoken_cannot_reproduce_are_left_alone(tmp_path_factory):
    """A normaliser other than NFC, an added token that strips spaces: tokenizers keeps them."""
    import json

    from transformers import AutoTokenizer

    from sft.fast_bpe import _unsupported

    path = BUILDERS["qwen2"](tmp_path_factory.mktemp("q3"))
    spec = json.loads((path / "tokenizer.json").read_text())
    assert _unsupported(spec) == ""
    assert "normalizer" in _unsupported(dict(spec, normalizer={"type": "Lowercase"}))
    stripped = [dict(t, lstrip=True) if i == 0 else t for i, t in enumerate(spec["added_tokens"])]
    assert "strip" in _unsupported(dict(spec, added_tokens=stripped))
    assert "BPE" in _unsupported(dict(spec, model={"type": "Unigram"}))
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.split_special_tokens = True
    from sft.fast_bpe import FastBPE

    assert FastBPE.from_tokenizer(tok) is None
