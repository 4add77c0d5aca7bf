"""Render a conversation with the tokenizer's chat template and mark the tokens to train.

Trained tokens are each assistant turn's content plus its end-of-turn token; nothing else
(system, user, tool turns, role headers, separators after the end-of-turn token).

Two ways to find the assistant spans, because templates differ:
- templates with `{% generation %}` markers: transformers returns the assistant mask itself;
- all others: render the conversation up to each assistant turn with and without that turn.
  The difference is exactly the assistant's text. This needs a template that renders earlier
  turns the same whatever follows; templates that rewrite history (e.g. drop earlier reasoning)
  are refused with a message, never silently mis-masked.

This is the reference path: one conversation at a time, every rendering through
`apply_chat_template`. Data builds use sft/batch_encode.py, which gives the same tokens and masks
for a batch at once (tested token for token against this module) and falls back to it.
"""

from __future__ import annotations

import re

import numpy as np

from sft.errors import SFTError
from sft.sources import Record

IGNORE_INDEX = -100
# End-of-turn tokens of common template families, tried in order when the config names none.
KNOWN_EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


def resolve_eot_id(tokenizer, eot_token: str | None) -> int:
    if eot_token:
        ids = tokenizer.convert_tokens_to_ids([eot_token])
        if ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise SFTError(f"model.eot_token={eot_token!r} is not a token of the tokenizer")
        return ids[0]
    # Token by token, not get_vocab(): building a 151k-entry dict costs about a second per call.
    for tok in KNOWN_EOT_TOKENS:
        if tok in (tokenizer.chat_template or ""):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is not None and (tid != tokenizer.unk_token_id or tok == tokenizer.unk_token):
                return tid
    if tokenizer.eos_token_id is None:
        raise SFTError("tokenizer has no eos token and model.eot_token is not set")
    return tokenizer.eos_token_id


def _render(tokenizer, messages, template, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the pattern transformers looks for


def has_generation_markers(template: str) -> bool:
    """The template marks what assistant turns train on; both encoding paths decide by this one test."""
    return bool(_GENERATION.search(template))


def _assistant_char_spans(tokenizer, messages, template, where) -> tuple[str, list[tuple[int, int]]]:
    full = _render(tokenizer, messages, template)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, True)
        through = _render(tokenizer, messages[: i + 1], template)
        if not (through.startswith(before) and full.startswith(through)):
            raise SFTError(
                f"{where}: the chat template renders earlier turns differently once later turns follow, so "
                "assistant tokens cannot be located exactly; use a template with {% generation %} markers"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(record: Record, tokenizer, eot_id: int, template: str | None) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX where not trained) for one record."""
    ids, target = encode_conversation(record, tokenizer, eot_id, template)
    labels = np.where(target, ids, IGNORE_INDEX)
    return ids.tolist(), labels.tolist()


def encode_conversation(record: Record, tokenizer, eot_id: int, template: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and the trained-token mask (bool) for one record: the form the data cache stores."""
    if record.text is not None:
        ids = tokenizer(record.text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        return np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool)
    template = template or tokenizer.chat_template
    if not template:
        raise SFTError("the tokenizer has no chat template; set model.chat_template to a .jinja file")
    if has_generation_markers(template):
        out = tokenizer.apply_chat_template(
            list(record.messages), chat_template=template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = np.asarray(out["input_ids"], dtype=np.int32)
        mask = np.asarray(out["assistant_masks"], dtype=bool)
    else:
        text, spans = _assistant_char_spans(tokenizer, record.messages, template, record.where)
        ids, mask = _encode_with_spans(tokenizer, text, spans)
    return ids, _close_turns_at_eot(ids, mask, eot_id, tokenizer, record.where)


def _encode_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise `text` and mark the tokens that start inside any of the character spans.

    The Rust encoding is asked only where each span begins and ends (char_to_token): building the
    full offset list costs as much as the tokenisation itself.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a pure-Python tokenizer: offsets are the only way
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        starts = np.asarray([o[0] for o in enc["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            mask |= (starts >= lo) & (starts < hi)
        return ids, mask
    enc = backend.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        mask[_first_token_from(enc, lo, len(text), len(ids)) : _first_token_from(enc, hi, len(text), len(ids))] = True
    return ids, mask


def _first_token_from(enc, pos: int, n_chars: int, n_tokens: int) -> int:
    """Index of the first token whose first character is at or after `pos` (n_tokens if none)."""
    while pos < n_chars:
        t = enc.char_to_token(pos)
        if t is not None:
            return t if enc.token_to_chars(t)[0] >= pos else t + 1
        pos += 1  # a character no token covers (dropped by normalisation): look further on
    return n_tokens


def _close_turns_at_eot(ids: np.ndarray, mask: np.ndarray, eot_id: int, tokenizer, where: str) -> np.ndarray:
    """Keep each trained run up to and including its end-of-turn token; drop the template's trailing separators."""
    target = np.zeros(len(ids), dtype=bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    for j, k in zip(edges[0::2].tolist(), edges[1::2].tolist()):  # each trained run is [j, k)
        eots = np.flatnonzero(ids[j:k] == eot_id)
        if len(eots):
            last = j + int(eots[-1])
        elif k < len(ids) and ids[k] == eot_id:
            last = k  # some marker templates leave the end-of-turn token just outside the marked span
        else:
            name = tokenizer.convert_ids_to_tokens(eot_id)
            raise SFTError(
                f"{where}: an assistant turn does not end with the end-of-turn token {name!r}, so the model "
                "would never learn to stop; set model.eot_token or fix the chat template"
            )
        target[j : last + 1] = True
    return target
