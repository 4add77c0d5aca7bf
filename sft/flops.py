"""Model FLOPs of a training step: the one formula behind the logged MFU, `sft-plan`'s time estimate and the GPU check.

Model FLOPs, not hardware FLOPs: work that activation checkpointing repeats is not counted, so the
same run reports the same MFU with checkpointing on or off, and MFU compares across tools.
- Every matrix multiply by a weight costs 2 FLOPs per weight per token forward. Backward costs 4 for
  a trained weight (input gradient + weight gradient) and 2 for a frozen one (input gradient only), so
  trained weights count 6 and frozen weights 4 (a LoRA run's base model).
- The input embedding is a lookup, not a multiply, and is left out; a tied output layer is a multiply
  and is counted once.
- Attention scores and the weighted sum cost 2 x 2 x heads x head_dim FLOPs per attended (query, key)
  pair forward, 3x that with backward. Packed documents never attend to each other and attention is
  causal, so a document of length l has l(l+1)/2 pairs: the attention term is computed from the real
  document lengths of the step, not from the row length.

Parameter counts are global on every backend: an FSDP2 DTensor's numel() is already global and a
ZeRO-3 partitioned parameter keeps its real size in `ds_numel` (its numel() is 0), so the same model
gives the same FLOPs on 1 process or 64, sharded or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn


def global_numel(p) -> int:
    """Elements of the whole parameter, whichever engine holds it."""
    ds = getattr(p, "ds_numel", None)
    return int(ds) if ds is not None else int(p.numel())


@dataclass(frozen=True)
class ModelFlops:
    dense_per_token: float  # 6 x trained + 4 x frozen weight elements that multiply activations
    attention_per_pair: float  # 3 x 2 x 2 x layers x heads x head_dim, per attended (query, key) pair

    def step_flops(self, tokens: float, pair_count: float) -> float:
        """FLOPs of `tokens` real tokens whose documents have `pair_count` = sum of l(l+1)/2 attended pairs."""
        return self.dense_per_token * tokens + self.attention_per_pair * pair_count

    def per_token(self, doc_lengths) -> float:
        """Average FLOPs per token over documents of these lengths."""
        lengths = np.asarray(doc_lengths, dtype=np.float64)
        return self.step_flops(lengths.sum(), attention_pairs(lengths)) / max(lengths.sum(), 1.0)


def attention_pairs(doc_lengths) -> float:
    lengths = np.asarray(doc_lengths, dtype=np.float64)
    return float((lengths * (lengths + 1) / 2).sum())


def model_flops(module: nn.Module, config=None) -> ModelFlops:
    """From the live (possibly sharded, possibly LoRA-wrapped) module, or a meta-device skeleton."""
    from sft.model import causal_lm

    lm = causal_lm(getattr(module, "model", module))
    config = config or lm.config
    embedding = lm.get_input_embeddings().weight
    output = lm.get_output_embeddings()
    dense = 0.0
    for p in lm.parameters():
        if p is embedding:
            continue
        dense += (6 if p.requires_grad else 4) * global_numel(p)
    if output is not None and output.weight is embedding:  # tied: the output multiply still happens
        dense += (6 if embedding.requires_grad else 4) * global_numel(embedding)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 3 * 2 * 2 * config.num_hidden_layers * config.num_attention_heads * head_dim
    return ModelFlops(float(dense), float(attention))


def mfu(flops: float, seconds: float, world: int, peak_flops_per_gpu: float) -> float:
    """Model FLOPs utilisation per GPU: achieved FLOPs per second per GPU over the GPU's peak."""
    return flops / max(seconds, 1e-12) / max(world, 1) / peak_flops_per_gpu
