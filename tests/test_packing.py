"""The global packing plan: exact best-fit-decreasing, every document once, same micro-steps on every
rank, world-size invariant slots, exact resume, balance, and speed at a million documents."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter

import numpy as np
import pytest

from sft.errors import SFTError
from sft.packing import (EMPTY_ROW, EpochPlan, best_fit_decreasing, build_rows, microstep_imbalance, packing_efficiency,
                         plan_epoch, rank_imbalance)


def sharegpt_lengths(n: int, seed: int = 0, max_length: int = 4096) -> np.ndarray:
    """Log-normal conversation lengths (median ~800 tokens, long tail), overlong ones dropped as prepare does."""
    lengths = np.random.default_rng(seed).lognormal(np.log(800), 1.0, n).astype(np.int64) + 8
    return lengths[lengths <= max_length]


def reference_bfd(lengths, capacity):
    """Best-fit-decreasing by exhaustive search: tightest bin; among equally tight ones, the bin whose
    room changed last (the plan's documented tie rule); longest documents first, ties in index order."""
    bins, room, stamp, clock = [], [], [], 0
    for doc in sorted(range(len(lengths)), key=lambda d: (-lengths[d], d)):
        n = int(lengths[doc])
        fits = [b for b in range(len(bins)) if room[b] >= n]
        if fits:
            b = min(fits, key=lambda b: (room[b], -stamp[b]))
        else:
            bins.append([]), room.append(capacity), stamp.append(0)
            b = len(bins) - 1
        bins[b].append(doc)
        room[b] -= n
        clock += 1
        stamp[b] = clock
    return [b for b in bins]


@pytest.mark.parametrize("seed", range(6))
def test_bfd_equals_exhaustive_reference(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(16, 300))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 400)))
    if seed % 2:  # many equal lengths: exercises the run-at-once placement
        lengths = rng.choice([3, 7, capacity // 2, capacity // 3 + 1, capacity], size=len(lengths))
    rows = best_fit_decreasing(lengths, capacity)
    assert rows == reference_bfd(lengths, capacity)
    assert all(lengths[r].sum() <= capacity for r in rows)
    assert sorted(d for r in rows for d in r) == list(range(len(lengths)))


def test_bfd_refuses_a_document_longer_than_a_row():
    with pytest.raises(SFTError, match="exceeds the row capacity"):
        best_fit_decreasing(np.array([5, 20]), 16)


def test_packing_efficiency_at_least_99_percent_on_sharegpt_like_lengths():
    lengths = sharegpt_lengths(20_000)
    rows = build_rows(lengths, "bfd", 4096)
    eff = packing_efficiency(rows, lengths, 4096)
    assert eff >= 0.99, eff
    assert packing_efficiency(build_rows(lengths, "off", 4096), lengths, 4096) < 0.4  # what packing buys


def plan_docs(plan: EpochPlan) -> list[int]:
    return [d for step in plan.steps for slot in step for row in slot for d in row]


def test_plan_is_deterministic_and_covers_every_document_once():
    lengths = sharegpt_lengths(3000, seed=1)
    rows = build_rows(lengths, "bfd", 4096)
    a = plan_epoch(rows, lengths, seed=7, epoch=0, global_rows=16, micro_rows=2)
    b = plan_epoch(rows, lengths, seed=7, epoch=0, global_rows=16, micro_rows=2)
    assert a.steps == b.steps
    assert Counter(plan_docs(a)) == Counter(range(len(lengths)))  # nothing lost, nothing duplicated
    other_epoch = plan_epoch(rows, lengths, seed=7, epoch=1, global_rows=16, micro_rows=2)
    assert other_epoch.steps != a.steps and Counter(plan_docs(other_epoch)) == Counter(range(len(lengths)))


def test_upsampled_documents_appear_exactly_as_often_as_in_the_dataset():
    # A split with repeated rows (an upsampled source) is a list of document indices with repeats:
    # the plan must carry each copy once, no more, no less.
    lengths = np.array([100, 200, 300, 100, 200, 300, 50])
    rows = build_rows(lengths, "bfd", 512)
    plan = plan_epoch(rows, lengths, seed=0, epoch=0, global_rows=4, micro_rows=1)
    assert Counter(plan_docs(plan)) == Counter(range(len(lengths)))


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_rank_gets_the_same_number_of_micro_steps(world):
    lengths = sharegpt_lengths(1001, seed=2)
    rows = build_rows(lengths, "bfd", 4096)
    plan = plan_epoch(rows, lengths, seed=0, epoch=0, global_rows=16, micro_rows=2)
    for s in range(len(plan.steps)):
        counts = {len(plan.micro_batches(s, r, world)) for r in range(world)}
        assert counts == {8 // world}
    last = plan.steps[-1]
    assert sum(row == EMPTY_ROW for slot in last for row in slot) == 16 * len(plan.steps) - len(rows)


def test_slots_do_not_depend_on_the_world_size():
    lengths = sharegpt_lengths(2000, seed=3)
    rows = build_rows(lengths, "bfd", 4096)
    plan = plan_epoch(rows, lengths, seed=1, epoch=0, global_rows=32, micro_rows=4)
    for s in range(len(plan.steps)):
        single = plan.micro_batches(s, 0, 1)
        for world in (2, 4, 8):
            rebuilt = [None] * len(single)
            for r in range(world):
                for m, mb in enumerate(plan.micro_batches(s, r, world)):
                    rebuilt[m * world + r] = mb
            assert rebuilt == single


def test_micro_batches_refuse_a_world_that_does_not_divide_the_slots():
    plan = plan_epoch([[0], [1], [2]], np.array([1, 1, 1]), 0, 0, global_rows=6, micro_rows=2)
    with pytest.raises(SFTError, match="cannot be shared evenly"):
        plan.micro_batches(0, 0, 2)


def _remaining_global_batches(args):
    """What one process of a resumed job computes: its own micro-batches for steps k.. (the plan is rebuilt from scratch)."""
    lengths, seed, epoch, k, rank, world = args
    rows = build_rows(lengths, "bfd", 4096)
    plan = plan_epoch(rows, lengths, seed, epoch, global_rows=16, micro_rows=2)
    return [plan.micro_batches(s, rank, world) for s in range(k, len(plan.steps))]


def test_resume_on_two_processes_and_on_one_gives_the_uninterrupted_batches():
    lengths = sharegpt_lengths(1500, seed=4)
    seed, epoch, k = 3, 2, 5
    rows = build_rows(lengths, "bfd", 4096)
    uninterrupted = plan_epoch(rows, lengths, seed, epoch, global_rows=16, micro_rows=2).steps[k:]
    ctx = mp.get_context("spawn")  # fresh interpreters: no state shared with this one
    with ctx.Pool(2) as pool:
        two = pool.map(_remaining_global_batches, [(lengths, seed, epoch, k, r, 2) for r in range(2)])
        one = pool.map(_remaining_global_batches, [(lengths, seed, epoch, k, 0, 1)])[0]
    for i, step in enumerate(uninterrupted):
        assert one[i] == step
        interleaved = [two[m % 2][i][m // 2] for m in range(len(step))]  # slot m ran on rank m % 2
        assert interleaved == step


def test_balancing_reduces_the_attention_cost_imbalance():
    lengths = sharegpt_lengths(20_000, seed=5)
    rows = build_rows(lengths, "bfd", 4096)
    balanced = plan_epoch(rows, lengths, 0, 0, global_rows=64, micro_rows=4)
    naive = plan_epoch(rows, lengths, 0, 0, global_rows=64, micro_rows=4, balance=False)
    assert Counter(plan_docs(balanced)) == Counter(plan_docs(naive))
    assert rank_imbalance(balanced, lengths, 8) < 0.02 and rank_imbalance(naive, lengths, 8) > 0.2
    assert microstep_imbalance(balanced, lengths, 8) < 0.03 < 0.3 < microstep_imbalance(naive, lengths, 8)


@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_one_row_per_micro_batch_is_still_balanced_per_step_for_any_world(world):
    # Nothing to even out inside a slot: the Gray-code order of the slots does the balancing.
    lengths = sharegpt_lengths(40_000, seed=5)
    rows = build_rows(lengths, "bfd", 4096)
    plan = plan_epoch(rows, lengths, 0, 0, global_rows=64, micro_rows=1)
    naive = plan_epoch(rows, lengths, 0, 0, global_rows=64, micro_rows=1, balance=False)
    assert rank_imbalance(plan, lengths, world) < 0.35 * rank_imbalance(naive, lengths, world)
    if world <= 8:
        assert rank_imbalance(plan, lengths, world) < 0.06


def test_a_million_documents_pack_and_plan_in_seconds():
    lengths = np.random.default_rng(6).lognormal(np.log(800), 1.0, 1_000_000).astype(np.int64).clip(8, 4096)
    t0 = time.perf_counter()
    rows = build_rows(lengths, "bfd", 4096)
    packed = time.perf_counter() - t0
    plan = plan_epoch(rows, lengths, 0, 0, global_rows=256, micro_rows=4)
    planned = time.perf_counter() - t0 - packed
    assert sum(len(r) for r in rows) == len(lengths)
    assert packing_efficiency(rows, lengths, 4096) > 0.999
    # ~1.5 s and ~1 s on an idle 2-core machine; generous bounds for a loaded CI runner.
    assert packed < 20 and planned < 20, (packed, planned)
    assert len(plan.steps) == -(-len(rows) // 256)
