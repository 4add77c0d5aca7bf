"""Render a conversation with the tokenizer's chat template and mark the tokens to train.

Trained tokens are each assistant turn's content plus its end-of-turn token; nothing else
(system, user, tool turns, role headers, separators after the end-of-turn token).

Two ways to find the assistant spans, because templates differ:
- templates with `{% generation %}` markers: transformers returns the assistant mask itself;
- all others: render the conversation up to each assistant turn with and without that turn.
  The difference is exactly the assistant's text. This needs a template that renders earlier
  turns the same whatever follows; templates that rewrite history (e.g. drop earlier reasoning)
  are refused with a message, never silently mis-masked.
"""

from __future__ import annotations

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
    vocab = tokenizer.get_vocab()
    for tok in KNOWN_EOT_TOKENS:
        if tok in vocab and tok in (tokenizer.chat_template or ""):
            return vocab[tok]
    if tokenizer.eos_token_id is None:
        raise SFTError("tokenizer has no eos token and model.eot_token is not set")
    return tokenizer.eos_token_id


def _render(tokenizer, messages, template, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_char_spans(tokenizer, messages, template, where) -> tuple[str, list[tuple[int, int]]]:
    full = _render(tokenizer, messages, template)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], template, add_generation_prompt=True)
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
    if record.text is not None:
        ids = tokenizer(record.text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids)
    template = template or tokenizer.chat_template
    if not template:
        raise SFTError("the tokenizer has no chat template; set model.chat_template to a .jinja file")
    if "{% generation %}" in template or "{%- generation %}" in template:
        out = tokenizer.apply_chat_template(
            list(record.messages), chat_template=template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        text, spans = _assistant_char_spans(tokenizer, record.messages, template, record.where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        mask = [0] * len(ids)
        for lo, hi in spans:
            for j, (start, _end) in enumerate(enc["offset_mapping"]):
                if lo <= start < hi:
                    mask[j] = 1
    labels = _close_turns_at_eot(ids, mask, eot_id, tokenizer, record.where)
    return ids, labels


def _close_turns_at_eot(ids, mask, eot_id, tokenizer, where) -> list[int]:
    """Keep each trained run up to and including its end-of-turn token; drop the template's trailing separators."""
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    while j < len(ids):
        if not mask[j]:
            j += 1
            continue
        k = j
        while k < len(ids) and mask[k]:
            k += 1
        run = range(j, k)
        eots = [t for t in run if ids[t] == eot_id]
        if not eots:
            # Some marker templates leave the end-of-turn token just outside the marked span.
            if k < len(ids) and ids[k] == eot_id:
                eots = [k]
            else:
                name = tokenizer.convert_ids_to_tokens(eot_id)
                raise SFTError(
                    f"{where}: an assistant turn does not end with the end-of-turn token {name!r}, so the model "
                    "would never learn to stop; set model.eot_token or fix the chat template"
                )
        for t in range(j, eots[-1] + 1):
            labels[t] = ids[t]
        j = k
    return labels
