"""Recall of near-duplicate detection at and around its threshold, on generated pairs of known Jaccard similarity.

    python bench/near_dedup_recall.py [PAIRS]

Each pair is two conversations over 200 distinct words of which `common` are shared (word 1-grams, so the
similarity is exactly common / (common + 2 x unique)), under one long system prompt shared by every
conversation (left out of the comparison). Prints the fraction of pairs whose second copy is dropped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_near_dedup import _decide, _pair  # noqa: E402

from sft import curation  # noqa: E402
from sft.curation import FilterConfig, lsh_bands  # noqa: E402


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    cfg = FilterConfig(near_dedup=True, near_dedup_threshold=0.85, near_dedup_ngram=1)
    bands, rows = lsh_bands(cfg.near_dedup_num_perm, cfg.near_dedup_threshold)
    print(f"threshold {cfg.near_dedup_threshold}, {cfg.near_dedup_num_perm} permutations: {bands} bands of {rows} rows")
    rng = np.random.default_rng(123)
    for common, unique in ((170, 15), (180, 10), (168, 16)):
        conv = [m for k in range(pairs) for m in _pair(f"x{common}_{k}_", common, unique, rng)]
        decision, _ = _decide(conv, cfg)
        found = np.mean(decision.reason[1::2] == curation.FILTERS.index("near_duplicate"))
        print(f"Jaccard {common / (common + 2 * unique):.3f}: {found:.2%} of {pairs} pairs dropped")


if __name__ == "__main__":
    main()
