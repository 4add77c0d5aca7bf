"""Which examples of each source are held out for evaluation, and how many training copies each source gets.

Both steps work on row indices only (a few bytes per example), never on the examples themselves.
The eval split is carved from each source's raw records before any filter or sampling runs, so no
curation setting and no upsampling can move an eval example into training.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Optional

import numpy as np

from sft.errors import SFTError

log = logging.getLogger("sft.data")


def carve_eval(sizes: list[int], fraction: float, at_most: int, seed: int,
               identities: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per source, (eval, train) local record indices. Eval keeps its random order (the first eval
    examples are the ones printed and scored); train is in file order.

    `at_most` caps each source's eval examples (data.eval_max is per source). Each source's draw is
    seeded by (seed, its identity), never by its position or by the sources before it, so the same
    file gives the same eval examples alone and in any mixture. The identity is a digest of the
    source's content (not its path: moving the data keeps the cache, so it must keep the split too).
    """
    out = []
    for i, n in enumerate(sizes):
        ident = identities[i] if identities is not None else str(i)
        rng = np.random.default_rng([seed, int(hashlib.sha256(ident.encode()).hexdigest()[:15], 16)])
        order = rng.permutation(n)
        n_eval = min(at_most, int(round(fraction * n))) if n > 1 else 0
        out.append((order[:n_eval], np.sort(order[n_eval:])))
    return out


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights` that add up to exactly `total`."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    share = np.floor(exact).astype(np.int64)
    short = total - int(share.sum())
    share[np.argsort(-(exact - share), kind="stable")[:short]] += 1
    return share.tolist()


def mixture_targets(sources, available: list[int], mixture_size: Optional[int]) -> list[int]:
    """Training examples wanted from each source.

    count: exactly that many. weight: a share of what the weighted sources get together, which is
    data.mixture_size minus the other sources' examples when set, else what the weighted sources
    hold after filtering (so weights re-balance the mixture without changing its size). Neither:
    every kept example once.
    """
    want = [src.count if src.count is not None else n for src, n in zip(sources, available)]
    weighted = [i for i, src in enumerate(sources) if src.weight is not None]
    if not weighted:
        if mixture_size is not None:
            raise SFTError("data.mixture_size is set but no source has a weight to fill it with")
        return want
    fixed = sum(want[i] for i in range(len(sources)) if i not in weighted)
    if mixture_size is not None:
        budget = mixture_size - fixed
        if budget < 0:
            raise SFTError(f"data.mixture_size={mixture_size} is smaller than the {fixed} examples of the sources without a weight")
    else:
        budget = sum(available[i] for i in weighted)
    for i, share in zip(weighted, _largest_remainder(budget, [sources[i].weight for i in weighted])):
        want[i] = share
    return want


def sample_source(kept: np.ndarray, want: int, seed: int, index: int) -> np.ndarray:
    """`want` rows drawn from `kept`: a subset without replacement, or every row k times plus a random
    subset for the remainder (each row appears floor or ceil of want/len times: no row is favoured)."""
    rng = np.random.default_rng([seed, index])
    full, extra = divmod(want, len(kept)) if len(kept) else (0, 0)
    picked = np.concatenate([np.tile(kept, full), rng.choice(kept, size=extra, replace=False)]) if len(kept) else kept
    return np.sort(picked)


def mix(sources, kept: list[np.ndarray], mixture_size: Optional[int], seed: int) -> tuple[np.ndarray, list[dict]]:
    """The training rows of the mixture (with repeats when upsampled) and a report per source."""
    want = mixture_targets(sources, [len(k) for k in kept], mixture_size)
    rows, report = [], []
    for i, (src, rows_i, n) in enumerate(zip(sources, kept, want)):
        if n > 0 and not len(rows_i):
            raise SFTError(f"data source {src.path}: {n} training examples requested but none is left after filtering")
        picked = sample_source(rows_i, n, seed, i)
        rows.append(picked)
        report.append({"requested": int(n), "in_train": int(len(picked)), "upsampled": bool(n > len(rows_i)),
                       "repeats": round(n / len(rows_i), 3) if len(rows_i) else 0.0})
    return (np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)), report


def warn_upsampling(report: list[dict]) -> None:
    """Warn about every upsampled source of a prepared dataset. Called each time a cache is opened
    (built or reused), so a run on an existing cache still says that it repeats examples."""
    for src in report:
        if src.get("upsampled"):
            log.warning("data source %s: %d training examples requested, %d available after filtering: upsampling "
                        "(each example used %.2f times on average)", src["path"], src["requested"], src["kept"], src["repeats"])
