"""Curation filters: which tokenised examples are kept for training, and why the others are not.

Two halves, because the data is large and tokenisation runs in worker processes:
- `example_features` runs in the workers, once per example, and reduces the text to a few numbers
  (content hash, repetition ratio, cut-off and refusal flags, a MinHash signature);
- `decide` runs once in the main process over those numbers (numpy arrays, a few bytes per
  example) and returns one reason code per example.
Every filter is off by default except the three that correctness needs (too long for a row, nothing
left to train, a training copy of an eval example); each drop is attributed to the first filter, in
FILTERS order, that rejects it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from sft.errors import SFTError

# Order matters: a drop is counted against the first filter that rejects the example, and the
# de-duplication filters come last so that the copy they keep is one that passed everything else.
FILTERS = ("overlong", "no_target", "eval_copy", "prompt_length", "response_length", "repetition", "cutoff", "refusal",
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
    # Near-duplicates: Jaccard similarity of the sets of word n-grams of the user, assistant and tool
    # turns (system prompts left out: one shared by many conversations is not what makes two alike).
    # MinHash/LSH proposes candidates, tuned so that >= 99.9% of pairs at the threshold are proposed,
    # and each candidate is checked on the exact n-gram sets.
    near_dedup: bool = False
    near_dedup_threshold: float = 0.85  # exact Jaccard similarity at or above which two examples are duplicates
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


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Sorted distinct 32-bit hashes of the text's word n-grams (a text shorter than n is one n-gram).
    32 bits: two distinct n-grams of a pair collide with odds ~1e-6, far below what moves a threshold."""
    words = text.split()
    grams = {" ".join(words[i : i + ngram]) for i in range(max(1, len(words) - ngram + 1))}
    hashes = [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") for g in grams]
    return np.unique(np.asarray(hashes, dtype=np.uint32))


@functools.lru_cache(maxsize=4)
def _seeds(num_perm: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 2**63, size=num_perm, dtype=np.uint64)[:, None]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of 64-bit integers whose outputs look independent for
    different inputs. (A linear a*h + b mod p family is not enough here: its "permutations" order
    32-bit inputs nearly alike, so LSH bands stop being independent and recall falls.)"""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def minhash_signature(shingles: np.ndarray, num_perm: int) -> np.ndarray:
    """MinHash of a set of 32-bit hashes: for each of num_perm seeded hash functions, the smallest
    value over the set (its top 32 bits). Two sets agree on one entry with probability = their
    Jaccard similarity, independently from entry to entry."""
    if not len(shingles):
        return np.full(num_perm, 0xFFFFFFFF, dtype=np.uint32)
    with np.errstate(over="ignore"):
        values = _mix64(_seeds(num_perm) ^ shingles.astype(np.uint64)[None, :])
    return (values.min(axis=1) >> np.uint64(32)).astype(np.uint32)


def near_dedup_text(messages, text: str | None) -> str:
    """What near-duplicate detection compares: every turn but the system prompt."""
    if text is not None:
        return text
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


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
        shingles = shingle_hashes(near_dedup_text(messages, text), cfg.near_dedup_ngram)
        out["shingles"] = shingles
        out["minhash"] = minhash_signature(shingles, cfg.near_dedup_num_perm)
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


class Sketches:
    """Per-row MinHash signatures and exact n-gram sets, for near-duplicate detection. preprocess.py
    reads them from the memory-mapped cache; tests build them from lists."""

    def __init__(self, signature: Callable[[int], np.ndarray], shingles: Callable[[int], np.ndarray]):
        self.signature = signature
        self.shingles = shingles


def decide(cols: dict, train_rows: np.ndarray, eval_rows: np.ndarray, cfg: FilterConfig, max_length: int,
           sketches: Sketches | None = None) -> Decision:
    """One reason code per example. Eval examples face only the correctness filters (an eval set
    must not change with curation settings). Training copies of eval examples (same whitespace-
    normalised text) are always removed, whatever the settings: that is contamination. With
    near-dedup on, training near-copies of eval examples go too.

    `cols` holds numpy columns: num_tokens, num_target, prompt_tokens, overlong, content_hash, repetition, cutoff,
    refusal. `sketches` gives each row's MinHash signature and n-gram set (read from the memory-mapped table).
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
    duplicate_of: dict = {}
    ev = eval_rows[reason[eval_rows] == KEPT]
    _eval_copies(cols["content_hash"], ev, train, reason, duplicate_of)
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
    # Candidates for de-duplication: every surviving eval example first (they are never dropped
    # here), then surviving training examples in dataset order, so the first copy is the one kept.
    tr = np.sort(train_rows[reason[train_rows] == KEPT])
    if cfg.exact_dedup:
        _exact_duplicates(cols["content_hash"], ev, tr, reason, duplicate_of)
        tr = tr[reason[tr] == KEPT]
    if cfg.near_dedup:
        if sketches is None:
            raise SFTError("near de-duplication needs MinHash signatures")
        _near_duplicates(ev, tr, sketches, cfg, reason, duplicate_of)
    return Decision(reason=reason, flagged=flagged, duplicate_of=duplicate_of)


def _mark(reason: np.ndarray, code: int, bad: np.ndarray) -> None:
    reason[bad & (reason == KEPT)] = code


def _eval_copies(hashes: np.ndarray, ev: np.ndarray, train: np.ndarray, reason: np.ndarray, duplicate_of: dict) -> None:
    """Drop every training example whose normalised text equals a surviving eval example's."""
    copies = np.flatnonzero(train & (reason == KEPT) & np.isin(hashes, hashes[ev]))
    reason[copies] = FILTERS.index("eval_copy")
    first_row = {int(hashes[r]): int(r) for r in ev[::-1].tolist()}
    for row in copies[:64].tolist():
        duplicate_of[row] = first_row[int(hashes[row])]


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


def lsh_bands(num_perm: int, threshold: float, recall: float = 0.999) -> tuple[int, int]:
    """(bands, rows per band) for LSH over `num_perm` MinHash values: the most rows per band (fewest
    needless candidates) for which a pair of Jaccard similarity `threshold` shares at least one band
    with probability >= `recall`: 1 - (1 - t^rows)^bands. Pairs above the threshold do better still."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted sets of distinct hashes."""
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _near_duplicates(ev, tr, sketches: Sketches, cfg: FilterConfig, reason: np.ndarray, duplicate_of: dict) -> None:
    """Query-then-insert over eval then training examples: a training example is dropped when a kept
    one (or an eval example) has exact n-gram Jaccard similarity >= the threshold. LSH bands of the
    MinHash signatures only propose candidates; the index holds one entry per kept example."""
    bands, rows = lsh_bands(cfg.near_dedup_num_perm, cfg.near_dedup_threshold)
    tables: list[dict] = [{} for _ in range(bands)]
    code = FILTERS.index("near_duplicate")
    for group, is_train in ((ev, False), (tr, True)):
        for row in group.tolist():
            sig = sketches.signature(row)
            keys = [sig[i * rows : (i + 1) * rows].tobytes() for i in range(bands)]
            if is_train:
                candidates = sorted({c for t, k in zip(tables, keys) for c in t.get(k, ())})
                mine = sketches.shingles(row)
                similar = next((c for c in candidates if jaccard(mine, sketches.shingles(c)) >= cfg.near_dedup_threshold), None)
                if similar is not None:
                    reason[row] = code
                    if len(duplicate_of) < 256:
                        duplicate_of[row] = similar
                    continue
            for t, k in zip(tables, keys):
                t.setdefault(k, []).append(row)
