"""Encode many conversations in one go, token for token what `templating.encode_conversation` gives.

Why a second path: profiled on 2,000 real-looking conversations with the 151k Qwen2 tokenizer,
about 80% of the reference path is tokenisation and most of the rest is per-call overhead of
`apply_chat_template` (copying and checking inputs, a tokenizer call per conversation, one Python
token loop per assistant mask). Here a batch of conversations is rendered with the same renderer
`apply_chat_template` uses (`render_jinja_template`, with its `{% generation %}` tracker), then
tokenised in one batch (tiktoken where it reproduces the tokenizer exactly, sft/fast_bpe.py; else ONE
batched tokenizer call), and the masks come from the same character-to-token
rules the reference path applies. Nothing is approximated, so equality holds by construction;
it is also checked, not assumed:

- a tokenizer without a Rust backend, or a record the fast path cannot handle, takes the reference
  path (`encode_conversation`), record by record;
- the first chat record each encoder sees is encoded both ways; any difference switches this
  encoder to the reference path for good (with a warning) -- a guard against a transformers
  release whose `apply_chat_template` does something the fast path does not;
- for templates without generation markers the assistant spans come from rendering prefixes, as
  in the reference path; a template that rewrites history fails the same prefix checks and is sent
  to the reference path, which raises its error with the record's file:line.
"""

from __future__ import annotations

import logging

import numpy as np

from sft.fast_bpe import FastBPE
from sft.sources import Record
from sft.templating import _close_turns_at_eot, _first_token_from, encode_conversation, has_generation_markers

log = logging.getLogger("sft.data")


class BatchEncoder:
    def __init__(self, tokenizer, eot_id: int, template: str | None):
        self.tokenizer, self.eot_id, self.given = tokenizer, eot_id, template
        self.template = template or tokenizer.chat_template
        self.generation = bool(self.template) and has_generation_markers(self.template)
        self.fast = getattr(tokenizer, "backend_tokenizer", None) is not None and bool(self.template)
        self.checked = False
        self._compiled = None
        # tiktoken for byte-level BPE vocabularies it reproduces exactly (sft/fast_bpe.py), else tokenizers.
        self.bpe = FastBPE.from_tokenizer(tokenizer) if self.fast else None
        try:
            from transformers.utils.chat_template_utils import render_jinja_template

            self._render_jinja = render_jinja_template
        except ImportError:  # a transformers without it: the reference path only
            self.fast = False
        try:  # private in transformers; without it prefixes go through render_jinja_template too
            from transformers.utils.chat_template_utils import _compile_jinja_template

            if self.fast and not self.generation:
                self._compiled = _compile_jinja_template(self.template)
        except ImportError:
            pass

    # ------------------------------------------------------------------ public

    def encode(self, records: list[Record]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids int32, trained-token mask bool) per record, as encode_conversation returns them."""
        out: list = [None] * len(records)
        chats = [i for i, r in enumerate(records) if r.text is None]
        texts = [i for i, r in enumerate(records) if r.text is not None]
        if texts:
            enc = self.tokenizer([records[i].text for i in texts], add_special_tokens=True)["input_ids"]
            for i, ids in zip(texts, enc):
                ids = np.asarray(ids + [self.tokenizer.eos_token_id], dtype=np.int32)
                out[i] = (ids, np.ones(len(ids), dtype=bool))
        if chats and self.fast and not self.checked:
            self._check(records[chats[0]])
        if chats and not self.fast:
            for i in chats:
                out[i] = encode_conversation(records[i], self.tokenizer, self.eot_id, self.given)
        elif chats:
            for i, res in zip(chats, self._encode_chats([records[i] for i in chats])):
                out[i] = res
        return out

    def encode_messages(self, messages: list[dict], where: str) -> tuple[np.ndarray, np.ndarray]:
        return self.encode([Record(messages=tuple(messages), where=where)])[0]

    # ------------------------------------------------------------------ internals

    def _check(self, rec: Record) -> None:
        self.checked = True
        try:
            want = encode_conversation(rec, self.tokenizer, self.eot_id, self.given)
        except Exception:  # noqa: BLE001 - the record is bad whatever the path: the reference path reports it
            return
        got = self._encode_chats([rec])[0]
        if not (np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])):
            log.warning("the batched chat-template path differs from apply_chat_template on %s with this tokenizer and "
                        "template: using the reference path (slower, same result)", rec.where)
            self.fast = False

    def _render(self, convs: list[list[dict]], generation_prompt: bool, track: bool = False):
        # What apply_chat_template does before rendering: drop keys whose value is None, then the
        # tokenizer's special tokens as template variables.
        convs = [[{k: v for k, v in m.items() if v is not None} for m in c] for c in convs]
        if self._compiled is not None and not track:
            # The prefixes of the spans path: the compiled template called as render_jinja_template calls it,
            # without its per-conversation deep copy (our messages are plain str -> str dicts, and the sandbox
            # is immutable); the first-record check against apply_chat_template covers this too.
            specials = self.tokenizer.special_tokens_map
            return [self._compiled.render(messages=c, tools=None, documents=None, add_generation_prompt=generation_prompt,
                                          **specials) for c in convs], []
        return self._render_jinja(conversations=convs, chat_template=self.template, return_assistant_tokens_mask=track,
                                  add_generation_prompt=generation_prompt, **self.tokenizer.special_tokens_map)

    def _encode_chats(self, records: list[Record]) -> list[tuple[np.ndarray, np.ndarray]]:
        convs = [[dict(m) for m in r.messages] for r in records]
        if self.generation:
            texts, spans = self._render(convs, False, track=True)
            spans = [list(s) for s in spans]
        else:
            texts, spans = self._prefix_spans(convs)
        todo = [i for i, s in enumerate(spans) if s is not None]
        enc = self._tokenize([texts[i] for i in todo]) if todo else []
        out: list = [None] * len(records)
        for i, e in zip(todo, enc):
            ids = np.asarray(e.ids, dtype=np.int32)
            mask = self._generation_mask(e, spans[i], len(ids)) if self.generation else self._span_mask(e, texts[i], spans[i], len(ids))
            out[i] = (ids, _close_turns_at_eot(ids, mask, self.eot_id, self.tokenizer, records[i].where))
        for i, res in enumerate(out):
            if res is None:  # the fast checks failed: the reference path decides (and names file:line if it refuses)
                out[i] = encode_conversation(records[i], self.tokenizer, self.eot_id, self.given)
        return out

    def _tokenize(self, texts: list[str]) -> list:
        """Encodings of `texts` (ids and character offsets), as `tokenizer(texts, add_special_tokens=False)` makes
        them: through tiktoken where it gives the same tokens (sft/fast_bpe.py), the rest in one batched call."""
        if self.bpe is None:
            return self._tokenize_hf(texts)
        out = [self._bpe_encode(t) for t in texts]
        rest = [i for i, e in enumerate(out) if e is None]
        for i, e in zip(rest, self._tokenize_hf([texts[i] for i in rest]) if rest else []):
            out[i] = e
        return out

    def _bpe_encode(self, text: str):
        """tiktoken's encoding, or None for the texts it leaves to tokenizers (NFC would change them; lone
        surrogates, which have no UTF-8: tokenizers then fails as the reference path does)."""
        if not self.bpe.handles(text):
            return None
        try:
            return self.bpe.encode(text)
        except UnicodeEncodeError:
            return None

    def _tokenize_hf(self, texts: list[str]) -> list:
        """Rust encodings of `texts`. Called on the backend directly when nothing in between could differ (no
        truncation or padding set, special-token splitting as the tokenizer says): that skips building Python
        lists of every id and mask."""
        backend = self.tokenizer.backend_tokenizer
        split = bool(getattr(self.tokenizer, "split_special_tokens", False))
        if backend.truncation is None and backend.padding is None and hasattr(backend, "encode_special_tokens"):
            if backend.encode_special_tokens != split:
                backend.encode_special_tokens = split
            return backend.encode_batch(texts, add_special_tokens=False)
        return self.tokenizer(texts, add_special_tokens=False).encodings

    def _prefix_spans(self, convs):
        """Per conversation, the full text and each assistant turn's character span, from rendering
        the prefixes before and through that turn (None where the template rewrites history)."""
        full, _ = self._render(convs, False)
        before_q, through_q, owner = [], [], []
        for c, msgs in enumerate(convs):
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    before_q.append(msgs[:i])
                    through_q.append(msgs[: i + 1])
                    owner.append(c)
        before = self._render(before_q, True)[0] if before_q else []
        through = self._render(through_q, False)[0] if through_q else []
        spans: list = [[] for _ in convs]
        for c, b, t in zip(owner, before, through):
            if spans[c] is None:
                continue
            if not (t.startswith(b) and full[c].startswith(t)):
                spans[c] = None
                continue
            spans[c].append((len(b), len(t)))
        return full, spans

    @staticmethod
    def _generation_mask(enc, spans, n: int) -> np.ndarray:
        """apply_chat_template's rule: tokens from the one holding a span's first character to the
        one holding its last (to the end when that is token 0 or none)."""
        mask = np.zeros(n, dtype=bool)
        for lo, hi in spans:
            start, end = enc.char_to_token(lo), enc.char_to_token(hi - 1)
            if start is None:
                break
            mask[start : end + 1 if end else n] = True
        return mask

    @staticmethod
    def _span_mask(enc, text: str, spans, n: int) -> np.ndarray:
        """The reference rule for rendered-prefix spans: tokens whose first character lies inside."""
        mask = np.zeros(n, dtype=bool)
        for lo, hi in spans:
            mask[_first_token_from(enc, lo, len(text), n) : _first_token_from(enc, hi, len(text), n)] = True
        return mask

