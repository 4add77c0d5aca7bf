"""Near-duplicate detection honours its threshold: pairs of known Jaccard similarity at or above it are
found (recall >= 99%), pairs below are kept, and a system prompt shared by every conversation does
not make conversations alike."""

from __future__ import annotations

import numpy as np
from data_helpers import chat, data_config, numbered_chats, write_jsonl
from dataclasses import replace

from sft import curation
from sft.curation import FilterConfig, lsh_bands
from sft.data import prepare_data

SHARED_SYSTEM = " ".join(f"rule{i}" for i in range(1000))  # one long system prompt for every conversation


def _pair(tag: str, common: int, unique: int, rng) -> list[list[dict]]:
    """Two conversations whose word sets (n-gram size 1) have Jaccard similarity common / (common + 2 unique)."""
    shared = [f"{tag}c{i}" for i in range(common)]
    out = []
    for side in "ab":
        words = shared + [f"{tag}{side}{i}" for i in range(unique)]
        rng.shuffle(words)
        half = len(words) // 2
        out.append(chat(" ".join(words[:half]), " ".join(words[half:]), system=SHARED_SYSTEM)["messages"])
    return out


def _decide(conversations, cfg):
    feats = [curation.example_features(m, None, cfg, None) for m in conversations]
    n = len(feats)
    cols = {"num_tokens": np.full(n, 100), "num_target": np.full(n, 50), "prompt_tokens": np.full(n, 50),
            "overlong": np.zeros(n, bool), "content_hash": np.array([f["content_hash"] for f in feats]),
            "repetition": np.zeros(n), "cutoff": np.zeros(n, bool), "refusal": np.zeros(n, bool)}
    sketches = curation.Sketches(lambda r: feats[r]["minhash"], lambda r: feats[r]["shingles"])
    return curation.decide(cols, np.arange(n), np.zeros(0, dtype=np.int64), cfg, 4096, sketches), feats


def test_recall_at_and_above_the_threshold_and_nothing_below():
    cfg = FilterConfig(near_dedup=True, near_dedup_threshold=0.85, near_dedup_ngram=1)
    rng = np.random.default_rng(0)
    # (common, unique per side) -> exact similarity; 200 words per conversation.
    kinds = {"at": (170, 15, 400), "above": (180, 10, 100), "just_below": (168, 16, 200), "below": (160, 20, 100)}
    conversations, labels = [], []
    for name, (common, unique, pairs) in kinds.items():
        for k in range(pairs):
            conversations += _pair(f"{name}{k}_", common, unique, rng)
            labels.append(name)
    decision, feats = _decide(conversations, cfg)
    second = decision.reason[1::2]  # the later copy of each pair is the one dropped
    near = curation.FILTERS.index("near_duplicate")
    found = {name: float(np.mean(second[[lab == name for lab in labels]] == near)) for name in kinds}
    # The pairs really have the similarity claimed (on the compared text, system prompt excluded).
    j = [curation.jaccard(feats[2 * i]["shingles"], feats[2 * i + 1]["shingles"]) for i in range(len(labels))]
    assert np.allclose([x for x, lab in zip(j, labels) if lab == "at"], 0.85)
    assert found["at"] >= 0.99 and found["above"] >= 0.99, found
    assert found["just_below"] == 0.0 and found["below"] == 0.0, found  # candidates are checked exactly
    assert (decision.reason[0::2] == curation.KEPT).all()


def test_a_shared_system_prompt_does_not_make_conversations_duplicates():
    cfg = FilterConfig(near_dedup=True, near_dedup_threshold=0.85, near_dedup_ngram=1)
    rng = np.random.default_rng(1)
    conversations = [m for k in range(50) for m in _pair(f"p{k}_", 60, 70, rng)]  # 0.3 similar apart from the system prompt
    decision, _ = _decide(conversations, cfg)
    assert (decision.reason == curation.KEPT).all()
    # ...which, with the system prompt counted, would have been 0.88 similar: the test could fail.
    whole = [curation.shingle_hashes("\n".join(m["content"] for m in c), 1) for c in conversations[:2]]
    assert curation.jaccard(*whole) >= 0.85


def test_band_choice_gives_the_recall_it_promises():
    for num_perm, t in ((128, 0.85), (128, 0.7), (256, 0.9), (64, 0.5), (128, 0.95)):
        bands, rows = lsh_bands(num_perm, t)
        assert bands * rows <= num_perm
        assert 1 - (1 - t**rows) ** bands >= 0.999
        if rows < num_perm:  # one more row per band would miss more than 0.1% of the pairs at the threshold
            assert 1 - (1 - t ** (rows + 1)) ** (num_perm // (rows + 1)) < 0.999


def test_end_to_end_near_dedup_with_a_data_level_system_prompt(tmp_path, tokenizer):
    """Short, different conversations under one long data.system_prompt are all kept; a reworded copy is not."""
    prose = " ".join(f"w{i}" for i in range(80))
    # One word changed: 5 of the 77 word 5-grams (with "Summarise.") differ: Jaccard 72/82 = 0.88.
    records = numbered_chats(30) + [chat("Summarise.", prose), chat("Summarise.", prose.replace("w30 ", "x30 ", 1))]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = replace(data_config(tmp_path, path, max_length=2048, system_prompt=SHARED_SYSTEM[:800]),
                  filters=FilterConfig(near_dedup=True, near_dedup_threshold=0.85))
    data = prepare_data(cfg, tokenizer, None, None)
    assert data.manifest["sources"][0]["dropped"] == {"near_duplicate": 1}
    assert len(data.train) == 31
