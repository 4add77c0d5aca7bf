"""Curation filters: which tokenised examples are kept for training, and why the others are not.

Two halves, because the data is large and tokenisation runs in worker processes:
- `example_features` runs in the workers, once per example, and reduces the text to a few numbers
  (content hash, repetition ratio, cut-off and refusal flags, a MinHash signature);
- `decide` runs once in the main process over those numbers (numpy arrays, a few bytes per
  example) and returns one reason code per example.
Every filter is off by default except the two that correctness needs (too long for a row, nothing
left to train); each drop is attributed to the first filter, in FILTERS order, that rejects it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from sft.errors import SFTError

# Order matters: a drop is counted against the first filter that rejects the example, and the
# de-duplication filters come last so that the copy they keep is one that passed everything else.
FILTERS = ("overlong", "no_target", "prompt_length", "response_length", "repetition", "cutoff", "refusal",
           "exact_duplicate", "near_duplicate")
KEPT = -1

DEFAULT_REFUSALS = [
    r"\bas an ai(?: language)? model\b",
    r"\bI(?:['’]m| am) (?:sorry|afraid),? but I (?:can(?:not|['’]t)|am unable|won['’]t)\b",
    r"\bI can(?:not|['’]t) (?:help|assist|provide|comply|fulfill)(?: you)? with (?:that|this)\b",
    r"\bI(?:['’]m| am) (?:not able|unable) to (?:help|assist|provide|comply)\b",
    r"\bI (?:must|have to) (?:decline|refuse)\b",
    r"\bI apologi[sz]e,? but\b",
]


@dataclass
class FilterConfig:
    # Token-length bounds. prompt = tokens not trained on (system, user, tool turns, role headers);
    # response = trained tokens. 0 / null switches a bound off.
    min_prompt_tokens: int = 0
    max_prompt_tokens: Optional[int] = None
    min_response_tokens: int = 0
    max_response_tokens: Optional[int] = None
    exact_dedup: bool = False  # drop conversations whose whitespace-normalised turns equal an earlier one
    near_dedup: bool = False  # MinHash/LSH over word n-grams of the whole conversation (datasketch)
    near_dedup_threshold: float = 0.85  # estimated Jaccard similarity at or above which two are duplicates
    near_dedup_num_perm: int = 128
    near_dedup_ngram: int = 5
    # Degenerate loops: drop when, in some assistant turn, 1 - distinct/total word n-grams exceeds this.
    max_repetition: Optional[float] = None
    repetition_ngram: int = 3
    drop_cutoff: bool = False  # drop conversations whose last answer stops mid-sentence or inside a code block
    refusals: str = "off"  # off | flag (count and report) | drop
    refusal_patterns: List[str] = field(default_factory=lambda: list(DEFAULT_REFUSALS))
    examples: int = 3  # dropped (or flagged) examples per filter kept in the manifest


def validate_filter_config(cfg: FilterConfig) -> None:
    if cfg.refusals not in ("off", "flag", "drop"):
        raise SFTError(f"data.filters.refusals={cfg.refusals!r}: expected off, flag or drop")
    if not 0 < cfg.near_dedup_threshold <= 1:
        raise SFTError(f"data.filters.near_dedup_threshold={cfg.near_dedup_threshold} must be in (0, 1]")
    if cfg.max_repetition is not None and not 0 <= cfg.max_repetition < 1:
        raise SFTError(f"data.filters.max_repetition={cfg.max_repetition} must be in [0, 1)")
    if min(cfg.repetition_ngram, cfg.near_dedup_ngram, cfg.near_dedup_num_perm) < 1:
        raise SFTError("data.filters: n-gram sizes and near_dedup_num_perm must be >= 1")
    for p in cfg.refusal_patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise SFTError(f"data.filters.refusal_patterns: {p!r} is not a valid regular expression ({exc})") from None


# ---------------------------------------------------------------- per example (in the workers)

def content_hash(messages, text: str | None) -> int:
    """64-bit hash of the conversation with whitespace runs collapsed: what "the same example" means to a reader."""
    h = hashlib.blake2b(digest_size=8)
    if text is not None:
        h.update(b"text\0" + " ".join(text.split()).encode())
    for m in messages:
        h.update(m["role"].encode() + b"\0" + " ".join(m["content"].split()).encode() + b"\1")
    return int.from_bytes(h.digest(), "little", signed=True)


def repetition_ratio(text: str, n: int) -> float:
    """1 - distinct / total word n-grams: ~0 for prose, near 1 for a model stuck in a loop."""
    words = text.split()
    total = len(words) - n + 1
    if total < 2 * n:  # too short to call anything a loop
        return 0.0
    return 1.0 - len({tuple(words[i : i + n]) for i in range(total)}) / total


_SENTENCE_END = set(".!?。！？…\"'”’)]}>*`|~$_")
_OPEN_END = set(",;:([{-–—/&+=")


def is_cut_off(answer: str) -> bool:
    """True when an answer visibly stops early: inside a ``` code block, or mid-sentence in a prose line.

    Short last lines (list items, labels, one-word answers) are never called cut off: they often
    lack final punctuation on purpose.
    """
    text = answer.rstrip()
    if text.count("```") % 2:
        return True
    if not text or text[-1] in _SENTENCE_END:
        return False
    last_line = text.rsplit("\n", 1)[-1]
    return text[-1] in _OPEN_END or (text[-1].isalnum() and len(last_line.split()) >= 8)


def minhash_signature(text: str, num_perm: int, ngram: int) -> np.ndarray:
    from datasketch import MinHash

    words = text.split()
    shingles = {" ".join(words[i : i + ngram]) for i in range(max(1, len(words) - ngram + 1))}
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([s.encode() for s in shingles])
    return m.hashvalues.astype(np.uint32)  # 32-bit values under both the 2.x default scheme and 1.x


def example_features(messages, text: str | None, cfg: FilterConfig, refusal_re: re.Pattern | None) -> dict:
    """The numbers `decide` needs, from the normalised record (not the tokens)."""
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    out = {"content_hash": content_hash(messages, text), "repetition": 0.0, "cutoff": False, "refusal": False}
    if cfg.max_repetition is not None:
        pieces = answers if text is None else [text]
        out["repetition"] = max((repetition_ratio(a, cfg.repetition_ngram) for a in pieces), default=0.0)
    if cfg.drop_cutoff and answers:
        out["cutoff"] = is_cut_off(answers[-1])
    if refusal_re is not None:
        out["refusal"] = any(refusal_re.search(a) for a in answers)
    if cfg.near_dedup:
        whole = text if text is not None else "\n".join(m["content"] for m in messages)
        out["minhash"] = minhash_signature(whole, cfg.near_dedup_num_perm, cfg.near_dedup_ngram)
    return out


def refusal_regex(cfg: FilterConfig) -> re.Pattern | None:
    if cfg.refusals == "off" or not cfg.refusal_patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in cfg.refusal_patterns), re.IGNORECASE)


# ---------------------------------------------------------------- decisions (in the main process)

@dataclass
class Decision:
    reason: np.ndarray  # per example: index into FILTERS, or KEPT
    flagged: np.ndarray  # bool per example: matched the refusal patterns (whether or not it was dropped)
    duplicate_of: dict  # example -> the kept example it duplicates (for the manifest's examples)


def decide(cols: dict, train_rows: np.ndarray, eval_rows: np.ndarray, cfg: FilterConfig, max_length: int,
           signature: Callable[[int], np.ndarray] | None = None) -> Decision:
    """One reason code per example. Eval examples face only the correctness filters (an eval set
    must not change with curation settings), but training copies of eval examples are removed by
    the de-duplication filters: that is contamination, whatever else the settings say.

    `cols` holds numpy columns: num_tokens, num_target, prompt_tokens, overlong, content_hash, repetition, cutoff,
    refusal. `signature(row)` returns the MinHash signature of a row (read from the memory-mapped table).
    """
    n = len(cols["num_tokens"])
    reason = np.full(n, KEPT, dtype=np.int8)
    prompt = cols["prompt_tokens"]
    resp = cols["num_target"]
    checks = [
        ("overlong", cols["overlong"]),
        ("no_target", cols["num_target"] == 0),
    ]
    both = np.zeros(n, dtype=bool)
    both[train_rows] = True
    both[eval_rows] = True
    for name, bad in checks:
        _mark(reason, FILTERS.index(name), bad & both)
    train = np.zeros(n, dtype=bool)
    train[train_rows] = True
    length_bad = (prompt < cfg.min_prompt_tokens) | (prompt > (cfg.max_prompt_tokens or max_length))
    _mark(reason, FILTERS.index("prompt_length"), train & length_bad)
    length_bad = (resp < cfg.min_response_tokens) | (resp > (cfg.max_response_tokens or max_length))
    _mark(reason, FILTERS.index("response_length"), train & length_bad)
    if cfg.max_repetition is not None:
        _mark(reason, FILTERS.index("repetition"), train & (cols["repetition"] > cfg.max_repetition))
    if cfg.drop_cutoff:
        _mark(reason, FILTERS.index("cutoff"), train & cols["cutoff"])
    flagged = cols["refusal"].astype(bool) & train
    if cfg.refusals == "drop":
        _mark(reason, FILTERS.index("refusal"), flagged)
    duplicate_of: dict = {}
    # Candidates for de-duplication: every surviving eval example first (they are never dropped
    # here), then surviving training examples in dataset order, so the first copy is the one kept.
    ev = eval_rows[reason[eval_rows] == KEPT]
    tr = np.sort(train_rows[reason[train_rows] == KEPT])
    if cfg.exact_dedup:
        _exact_duplicates(cols["content_hash"], ev, tr, reason, duplicate_of)
        tr = tr[reason[tr] == KEPT]
    if cfg.near_dedup:
        if signature is None:
            raise SFTError("near de-duplication needs MinHash signatures")
        _near_duplicates(ev, tr, signature, cfg, reason, duplicate_of)
    return Decision(reason=reason, flagged=flagged, duplicate_of=duplicate_of)


def _mark(reason: np.ndarray, code: int, bad: np.ndarray) -> None:
    reason[bad & (reason == KEPT)] = code


def _exact_duplicates(hashes: np.ndarray, ev: np.ndarray, tr: np.ndarray, reason: np.ndarray, duplicate_of: dict) -> None:
    order = np.concatenate([ev, tr])
    _, first = np.unique(hashes[order], return_index=True)
    keep = np.zeros(len(order), dtype=bool)
    keep[first] = True
    dropped = order[len(ev):][~keep[len(ev):]]
    reason[dropped] = FILTERS.index("exact_duplicate")
    # Remember which copy each dropped example duplicates (only a few are reported).
    first_row = {int(hashes[order[i]]): int(order[i]) for i in first}
    for row in dropped[:64].tolist():
        duplicate_of[row] = first_row[int(hashes[row])]


def _near_duplicates(ev, tr, signature, cfg: FilterConfig, reason: np.ndarray, duplicate_of: dict) -> None:
    """Query-then-insert over eval then training examples: a training example is dropped when the index
    already holds one whose estimated Jaccard similarity reaches the threshold. LSH only proposes
    candidates (it has false positives), so each is checked against the signatures themselves.
    The index holds one entry per kept example."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.near_dedup_threshold, num_perm=cfg.near_dedup_num_perm)
    code = FILTERS.index("near_duplicate")
    for rows, is_train in ((ev, False), (tr, True)):
        for row in rows.tolist():
            sig = signature(row)
            mh = _lean_minhash(LeanMinHash, sig)
            if is_train:
                similar = [h for h in sorted(lsh.query(mh)) if np.mean(signature(h) == sig) >= cfg.near_dedup_threshold]
                if similar:
                    reason[row] = code
                    if len(duplicate_of) < 256:
                        duplicate_of[row] = similar[0]
                    continue
            lsh.insert(row, mh, check_duplication=False)


def _lean_minhash(cls, sig: np.ndarray):
    try:  # datasketch >= 2.0 wants the permutation scheme of stored values named (its default is affine32)
        return cls(seed=1, hashvalues=sig, scheme="affine32")
    except TypeError:  # datasketch 1.x: one scheme, no such argument
        return cls(seed=1, hashvalues=sig.astype(np.uint64))
