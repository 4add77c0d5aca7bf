"""The packing plan: which documents share a row, and which rows each rank trains at each step.

The plan is a pure function of (document lengths, seed, epoch, max_length, batch shape). It is
computed once for the whole dataset, never per rank or per map batch, so that
- every rank runs the same number of micro-steps (no rank waits forever at the end of an epoch),
- the global batch of step s is the same on 1 or N processes (world-size invariance), and
- resuming at (epoch, step) is instant and exact: recompute the plan, index it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sft.errors import SFTError


@dataclass
class PackingConfig:
    strategy: str = "bfd"  # bfd: best-fit-decreasing bins of <= data.max_length tokens | off: one document per row


Row = list  # document indices, in row order
EMPTY_ROW: Row = []  # pads a short last step; contributes no target tokens


class _OpenBins:
    """Open bins indexed by remaining capacity, with "smallest capacity >= n" in O(log C).

    A segment tree over capacities 0..C counts how many open bins have each capacity; best fit is
    the leftmost non-empty slot at or above the document length.
    """

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = np.zeros(2 * self.size, dtype=np.int64)
        self.by_cap: dict[int, list[int]] = {}

    def _add(self, cap: int, delta: int) -> None:
        i = cap + self.size
        while i:
            self.count[i] += delta
            i //= 2

    def push(self, cap: int, bin_id: int) -> None:
        self.by_cap.setdefault(cap, []).append(bin_id)
        self._add(cap, 1)

    def pop_best_fit(self, need: int) -> tuple[int, int] | None:
        cap = self._first_at_least(need)
        if cap is None:
            return None
        bin_id = self.by_cap[cap].pop()
        self._add(cap, -1)
        return cap, bin_id

    def _first_at_least(self, need: int) -> int | None:
        # Walk down from the root, preferring the left child whenever it overlaps [need, C] and is non-empty.
        def search(node: int, lo: int, hi: int) -> int | None:
            if hi < need or self.count[node] == 0:
                return None
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            left = search(2 * node, lo, mid)
            return left if left is not None else search(2 * node + 1, mid + 1, hi)

        return search(1, 0, self.size - 1)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[Row]:
    """Pack documents into as few rows of <= capacity tokens as best-fit-decreasing finds."""
    if len(lengths) and int(lengths.max()) > capacity:
        raise SFTError(f"a document of {int(lengths.max())} tokens exceeds the row capacity {capacity}")
    order = np.argsort(-lengths, kind="stable")  # stable: ties keep dataset order, so the plan is reproducible
    bins: list[Row] = []
    open_bins = _OpenBins(capacity)
    for doc in order.tolist():
        n = int(lengths[doc])
        found = open_bins.pop_best_fit(n)
        if found is None:
            cap, bin_id = capacity, len(bins)
            bins.append([])
        else:
            cap, bin_id = found
        bins[bin_id].append(doc)
        if cap - n > 0:
            open_bins.push(cap - n, bin_id)
    return bins


def build_rows(lengths: np.ndarray, strategy: str, max_length: int) -> list[Row]:
    if strategy == "bfd":
        return best_fit_decreasing(lengths, max_length)
    if strategy == "off":
        return [[i] for i in range(len(lengths))]
    raise SFTError(f"packing.strategy={strategy!r}: expected bfd or off")


def packing_efficiency(rows: list[Row], lengths: np.ndarray, max_length: int) -> float:
    used = sum(int(lengths[r].sum()) for r in rows if r)
    return used / max(1, len(rows) * max_length)


@dataclass(frozen=True)
class EpochPlan:
    """steps[s][slot] is the list of rows of one micro-batch; slot k runs on rank k % world at micro-step k // world.

    The number of slots per step (global rows / micro rows) does not depend on the world size, so
    the micro-batches themselves are identical on 1 or N processes.
    """

    steps: list[list[list[Row]]]

    def micro_batches(self, step: int, rank: int, world: int) -> list[list[Row]]:
        slots = self.steps[step]
        return [slots[k] for k in range(rank, len(slots), world)]


def plan_epoch(rows: list[Row], lengths: np.ndarray, seed: int, epoch: int, global_rows: int, micro_rows: int) -> EpochPlan:
    """Shuffle rows with (seed, epoch), cut them into global steps, and balance each step's slots by attention cost."""
    if global_rows % micro_rows:
        raise SFTError(f"train.global_batch_size={global_rows} is not a multiple of train.micro_batch_size={micro_rows}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(rows)).tolist()
    shuffled = [rows[i] for i in order]
    n_slots = global_rows // micro_rows
    steps = []
    for start in range(0, len(shuffled), global_rows):
        chunk = shuffled[start : start + global_rows]
        chunk += [EMPTY_ROW] * (global_rows - len(chunk))  # last step: same shape everywhere, no target tokens
        steps.append(_balance(chunk, lengths, n_slots, micro_rows))
    return EpochPlan(steps=steps)


def attention_cost(row: Row, lengths: np.ndarray) -> int:
    return int(sum(int(lengths[d]) ** 2 for d in row))


def _balance(rows: list[Row], lengths: np.ndarray, n_slots: int, per_slot: int) -> list[list[Row]]:
    """Longest-processing-time assignment of rows to slots by attention cost (sum of squared document lengths)."""
    costs = [attention_cost(r, lengths) + sum(int(lengths[d]) for d in r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-costs[i], i))
    slots: list[list[Row]] = [[] for _ in range(n_slots)]
    load = [0] * n_slots
    for i in order:
        k = min((k for k in range(n_slots) if len(slots[k]) < per_slot), key=lambda k: (load[k], k))
        slots[k].append(rows[i])
        load[k] += costs[i]
    return slots


def rank_imbalance(plan: EpochPlan, lengths: np.ndarray, world: int) -> float:
    """Mean over steps of (max rank attention cost / mean rank cost) - 1: 0 means perfectly balanced."""
    ratios = []
    for s in range(len(plan.steps)):
        per_rank = [sum(attention_cost(r, lengths) for mb in plan.micro_batches(s, k, world) for r in mb) for k in range(world)]
        mean = sum(per_rank) / world
        if mean:
            ratios.append(max(per_rank) / mean - 1)
    return float(np.mean(ratios)) if ratios else 0.0
