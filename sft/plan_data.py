"""The plan's look at the data: token counts for the time estimate, examples rendered with the trained
tokens marked, and the mask refusals of DESIGN point 4 (empty assistant mask, untrained end-of-turn
token, pad == eos, a template that trains on prompt tokens).

The data goes through the same `prepare_data` as sft.train, so the cache it builds (or finds) is the
one training opens, and every refusal training would make is made here first with the same message.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from sft.errors import SFTError
from sft.templating import IGNORE_INDEX

CHECKED_EXAMPLES = 2000  # examples whose masks are checked (the rendered ones are the first few)
ON, OFF = "\033[1;32m", "\033[0m"


@dataclass
class DataReport:
    lengths: object = None  # token counts of the training split's documents, or None
    summary: dict = field(default_factory=dict)
    refusals: list = field(default_factory=list)
    note: str = ""


def render(ids, labels, tokenizer, colour: bool) -> str:
    """The example's text with trained spans marked: green on a terminal, [[...]] otherwise."""
    out, start = [], 0
    trained = np.asarray(labels) != IGNORE_INDEX
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = tokenizer.decode([int(t) for t in ids[start:i]], skip_special_tokens=False)
            if trained[start]:
                text = f"{ON}{text}{OFF}" if colour else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def mask_refusals(split, eot_id: int, pad_id, eos_id, raw_text: bool, limit: int = CHECKED_EXAMPLES) -> list[str]:
    refusals = []
    if pad_id is not None and pad_id in (eos_id, eot_id):
        refusals.append(f"pad token id {pad_id} == eos/end-of-turn: masking padding would mask the end of every answer")
    empty, eot_missing, prompt_trained = [], [], []
    for i in range(min(len(split), limit)):
        ids, labels = split.example(i)
        trained = labels != IGNORE_INDEX
        if not trained.any():
            empty.append(i)
            continue
        if not (trained & (ids == eot_id)).any():
            eot_missing.append(i)
        if not raw_text and trained[0]:
            prompt_trained.append(i)
    n = min(len(split), limit)
    if empty:
        refusals.append(f"{len(empty)} of {n} checked examples have an empty assistant mask (first: #{empty[0]}): nothing trains on them")
    if eot_missing:
        refusals.append(f"{len(eot_missing)} of {n} checked examples never train the end-of-turn token {eot_id} (first: #{eot_missing[0]}): "
                        "the model would not learn to stop; check model.eot_token and the chat template")
    if prompt_trained:
        refusals.append(f"{len(prompt_trained)} of {n} checked examples train their first (prompt) token (first: #{prompt_trained[0]}): "
                        "the template trains on prompts; use a template that marks assistant turns (model.chat_template)")
    return refusals


def _unavailable(msg: str) -> bool:
    return any(s in msg for s in ("cannot be loaded", "not downloaded", "no such file", "does not exist", "not set"))


def inspect(cfg, stream=sys.stdout) -> DataReport:
    from sft.data import prepare_data
    from sft.model import build_tokenizer
    from sft.templating import resolve_eot_id

    say = lambda *a: print(*a, file=stream)  # noqa: E731
    try:
        tokenizer = build_tokenizer(cfg.model)
    except SFTError as exc:
        if _unavailable(str(exc)):
            return DataReport(note=f"tokenizer not available here: {exc}")
        return DataReport(refusals=[str(exc)], note="tokenizer refused")
    try:
        eot_id = resolve_eot_id(tokenizer, cfg.model.eot_token)
        data = prepare_data(cfg.data, tokenizer, None, cfg.model.eot_token)
    except SFTError as exc:
        if _unavailable(str(exc).lower()):
            return DataReport(note=f"data not available here: {exc}")
        return DataReport(refusals=[str(exc)], note="data refused")
    split = data.train
    lengths = split.lengths
    raw_text = cfg.data.format == "text"
    colour = hasattr(stream, "isatty") and stream.isatty()
    say("")
    say(f"data: {len(split)} training examples, {int(lengths.sum()):,} tokens (cache {data.path}); "
        f"trained tokens shown {'in green' if colour else 'in [[brackets]]'}:")
    for i in range(min(cfg.plan.examples, len(split))):
        ids, labels = split.example(i)
        say(f"--- example #{i} ({len(ids)} tokens, {int((labels != IGNORE_INDEX).sum())} trained)")
        say(render(ids, labels, tokenizer, colour))
    refusals = mask_refusals(split, eot_id, tokenizer.pad_token_id, tokenizer.eos_token_id, raw_text)
    summary = {"examples": len(split), "tokens": int(lengths.sum()), "cache": str(data.path),
               "mean_length": float(lengths.mean()) if len(lengths) else 0.0, "max_length": int(lengths.max()) if len(lengths) else 0}
    return DataReport(lengths, summary, refusals)
