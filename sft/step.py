"""One optimizer step's gradient accumulation: the loss normalisation that makes training topology-invariant.

Kept apart from the loop (sft/train.py, which needs Hydra) so that every driver of an engine,
the GPU acceptance check included, takes a step exactly as training does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sft import distributed as D
from sft.loss import agreed_chunk_counts, chunks_needed


@dataclass
class StepTotals:
    """One optimizer step's counts, global over ranks, and this rank's loss still on the device."""

    local_loss_sum: torch.Tensor
    targets: float
    tokens: float
    attention_pairs: float

    def global_loss(self) -> float:
        """Mean loss per target token of the whole step: a collective (every rank calls it, at log steps only)."""
        return D.all_reduce_sum([float(self.local_loss_sum)])[0] / max(self.targets, 1.0)


def accumulate_gradients(engine, micro: list) -> StepTotals:
    """Backward over this rank's micro-batches of one optimizer step.

    The denominator is the global target-token count, summed before any backward pass, so every
    target token of the step weighs the same however the step is split over micro-batches and ranks.
    The same collective agrees on how many output-layer chunks each micro-step makes: sharded
    engines gather weights per module call, so every rank must make the same calls. Nothing here
    waits for the device: the loss is summed on it and read only when logged.
    """
    chunk = engine.module.chunk_size
    counts = D.all_reduce_sum([sum(m.num_target for m in micro), sum(m.num_tokens for m in micro),
                               sum(m.attention_pairs for m in micro)])
    chunks = agreed_chunk_counts([chunks_needed(m.num_target, chunk) for m in micro])
    scale = 1.0 / max(counts[0], 1.0)
    # float64 sum of the micro-steps (scalars, on the device) so the logged loss does not depend on the split
    loss_sum = sum(engine.forward_backward(m, scale, i == len(micro) - 1, chunks[i]).double() for i, m in enumerate(micro))
    return StepTotals(loss_sum, *counts)
