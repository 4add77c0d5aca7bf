"""Real tokenizers (Qwen2.5, Llama-3, Mistral v3; tests/real_tokenizers.py) under the chat templates their
model configs train with: the trained-token masks, token by token, through the project's own data path.

The expected mask is derived independently of sft.templating: each assistant turn's text plus its
end-of-turn token is searched for in the rendered conversation, and a token is expected to be trained
exactly when its first character lies inside one of those character spans (the tokenizer's own offsets).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import compose
from data_helpers import data_config, write_jsonl
from real_tokenizers import BUILDERS
from sft.data import prepare_data
from sft.errors import SFTError
from sft.model import build_tokenizer
from sft.templating import IGNORE_INDEX, resolve_eot_id

# model config -> (tokenizer builder, template the tokenizer ships with, what each trained span is)
FAMILIES = {
    # Qwen2.5 base ships a ChatML template (the config keeps the checkpoint's): chatml.jinja stands in for it.
    "qwen2_5_7b": ("qwen2", "chatml", lambda text: text + "<|im_end|>"),
    # Llama-3 / Mistral base ship none: their model configs name the template (model.chat_template).
    "llama3_8b": ("llama3", None, lambda text: text.strip() + "<|eot_id|>"),
    "mistral_7b": ("mistral", None, lambda text: " " + text + "</s>"),
}
CONVERSATIONS = [
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 12 x 12?"},
     {"role": "assistant", "content": "144."}, {"role": "user", "content": "And 13 x 13?"},
     {"role": "assistant", "content": "169, since 13 x 13 = 169."}],
    [{"role": "user", "content": "Traduis « bonjour » en chinois, s'il te plaît."},
     {"role": "assistant", "content": "你好 (nǐ hǎo) 👋\n\nVoilà !"}],
    [{"role": "user", "content": "Write a Python one-liner."},
     {"role": "assistant", "content": "print(sum(range(10)))  # 45\n"}, {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": " You're welcome."}],
]
# Ids the published tokenizers give "Hello world" (Qwen2: 9707 1879; Llama-3: bos, 9906 1917): the vocabulary is the real one.
HELLO = {"qwen2": [9707, 1879], "llama3": [128000, 9906, 1917]}
SIZES = {"qwen2": 151_665, "llama3": 128_256, "mistral": 32_768}


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-tokenizers")
    return lambda family, template=None: BUILDERS[family](root, template)


def _model_cfg(name, tokdir):
    family, shipped, _ = FAMILIES[name]
    cfg = compose([f"model={name}"]).model
    cfg.tokenizer = str(tokdir(family, shipped))
    return cfg


def _expected_mask(tokenizer, messages, trained_text) -> tuple[list[int], np.ndarray]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, pos = [], 0
    for m in messages:
        if m["role"] == "assistant":
            piece = trained_text(m["content"])
            start = text.index(piece, pos)
            spans.append((start, start + len(piece)))
            pos = start + len(piece)
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    starts = np.array([s for s, _ in enc.offsets])
    want = np.zeros(len(enc.ids), dtype=bool)
    for lo, hi in spans:
        want |= (starts >= lo) & (starts < hi)
    return enc.ids, want


def _show(tokenizer, ids, mask) -> str:
    return "".join(f"[{t}]" if m else t for t, m in zip(tokenizer.convert_ids_to_tokens(list(ids)), mask))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_masks_token_by_token_with_real_tokenizer(name, tokdir, tmp_path):
    cfg = _model_cfg(name, tokdir)
    tok = build_tokenizer(cfg)
    family = FAMILIES[name][0]
    assert len(tok) == SIZES[family]
    if family in HELLO:
        assert tok("Hello world")["input_ids"] == HELLO[family]
    eot_id = resolve_eot_id(tok, cfg.eot_token)
    assert eot_id == tok.convert_tokens_to_ids({"qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}[family])
    # The project's data path: a JSONL file -> sources -> template -> mask -> the prepared cache.
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS])
    data = prepare_data(data_config(tmp_path, path, max_length=512), tok, None, cfg.eot_token)
    assert len(data.train) == len(CONVERSATIONS)
    expected = {}
    for conv in CONVERSATIONS:
        want_ids, want = _expected_mask(tok, conv, FAMILIES[name][2])
        expected[tuple(want_ids)] = (want, sum(m["role"] == "assistant" for m in conv))
    seen = set()
    for i in range(len(data.train)):  # the split's order is the data pipeline's: match examples by their ids
        ids, labels = data.train.example(i)
        assert tuple(ids.tolist()) in expected, _show(tok, ids, labels != IGNORE_INDEX)
        want, turns = expected[tuple(ids.tolist())]
        seen.add(tuple(ids.tolist()))
        got = labels != IGNORE_INDEX
        assert got.tolist() == want.tolist(), f"\n got: {_show(tok, ids, got)}\nwant: {_show(tok, ids, want)}"
        assert (labels[got] == ids[got]).all()
        # One trained run per assistant turn, each ending with the end-of-turn token (trained); prompts are not.
        ends = np.flatnonzero(got & ~np.append(got[1:], False))
        assert len(ends) == turns and all(ids[e] == eot_id for e in ends)
        assert not got[0]
    assert len(seen) == len(CONVERSATIONS)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_config_pad_token_is_real_and_trainable_tokens_stay_apart(name, tokdir):
    cfg = _model_cfg(name, tokdir)
    tok = build_tokenizer(cfg)
    assert tok.pad_token == cfg.pad_token and tok.pad_token_id is not None
    assert tok.pad_token_id not in (tok.eos_token_id, resolve_eot_id(tok, cfg.eot_token))
    assert tok.pad_token_id < len(tok)  # an existing token: the vocabulary (and so the embeddings) is unchanged


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_without_pad_token_the_error_says_to_set_it(name, tokdir):
    cfg = _model_cfg(name, tokdir)
    cfg.pad_token = None
    with pytest.raises(SFTError, match=r"(has no pad token|pads with its eos token).*set model\.pad_token.*e\.g\. model\.pad_token="):
        build_tokenizer(cfg)


@pytest.mark.parametrize("pad, pattern", [("<|not_a_token|>", r"model\.pad_token='<\|not_a_token\|>' is not a token"),
                                          ("<|end_of_text|>", r"is its eos token, which must stay trainable"),
                                          ("<|eot_id|>", r"is the end-of-turn token")])
def test_bad_pad_token_is_refused(pad, pattern, tokdir):
    cfg = _model_cfg("llama3_8b", tokdir)
    cfg.pad_token = pad
    with pytest.raises(SFTError, match=pattern):
        build_tokenizer(cfg)
