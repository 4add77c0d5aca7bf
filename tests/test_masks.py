"""Assistant-only labels, checked token by token against hand-written expectations."""

from __future__ import annotations

import pytest

from conftest import TOKENIZER_DIR
from sft.errors import SFTError
from sft.sources import Record
from sft.templating import IGNORE_INDEX, resolve_eot_id, tokenize_conversation

CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "ab"},
    {"role": "assistant", "content": "cd"},
    {"role": "user", "content": "e f"},
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "gh"},
)

# (text, trained?) pieces as each template must render CONVERSATION.
CHATML = [
    ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n", False),
    ("cd<|im_end|>", True),
    ("\n<|im_start|>user\ne f<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n", False),
    ("gh<|im_end|>", True),
    ("\n", False),
]
LLAMA3 = [
    ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nab<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
    ("cd<|eot_id|>", True),
    ("<|start_header_id|>user<|end_header_id|>\n\ne f<|eot_id|><|start_header_id|>tool<|end_header_id|>\n\n42<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
    ("gh<|eot_id|>", True),
]


def _expected(tokenizer, pieces):
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


@pytest.mark.parametrize("template_file, pieces", [
    (None, CHATML),  # the tokenizer's own ChatML template, no generation markers
    ("chatml_generation.jinja", CHATML),  # same rendering, with {% generation %} markers
    ("llama3_template.jinja", LLAMA3),
])
def test_only_assistant_turns_and_their_end_of_turn_are_trained(tokenizer, template_file, pieces):
    template = (TOKENIZER_DIR / template_file).read_text() if template_file else None
    tok = tokenizer
    if template:
        tok = type(tokenizer).from_pretrained(str(TOKENIZER_DIR))
        tok.chat_template = template
    eot = resolve_eot_id(tok, None)
    ids, labels = tokenize_conversation(Record(messages=CONVERSATION, where="t:1"), tok, eot, None)
    want_ids, want_labels = _expected(tok, pieces)
    assert ids == want_ids
    assert labels == want_labels
    trained = [tok.convert_ids_to_tokens(i) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    end = "<|eot_id|>" if template_file == "llama3_template.jinja" else "<|im_end|>"
    assert trained == ["c", "d", end, "g", "h", end]


def test_raw_text_trains_every_token_and_eos(tokenizer):
    ids, labels = tokenize_conversation(Record(messages=(), where="t:1", text="abc"), tokenizer, 0, None)
    assert ids == labels
    assert ids[-1] == tokenizer.eos_token_id


def test_template_that_never_closes_assistant_turns_is_refused(tokenizer):
    tok = type(tokenizer).from_pretrained(str(TOKENIZER_DIR))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(SFTError, match="end-of-turn"):
        tokenize_conversation(Record(messages=CONVERSATION, where="f.jsonl:3"), tok, tok.eos_token_id, None)


def test_template_that_rewrites_history_is_refused(tokenizer):
    tok = type(tokenizer).from_pretrained(str(TOKENIZER_DIR))
    # Drops earlier assistant turns once a later one exists (like templates that strip old reasoning).
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(SFTError, match="f.jsonl:3.*renders earlier turns differently"):
        tokenize_conversation(Record(messages=CONVERSATION, where="f.jsonl:3"), tok, resolve_eot_id(tok, None), None)
