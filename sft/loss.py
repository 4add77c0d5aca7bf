"""Target-only, chunked cross-entropy, and the probe that proves packed documents are isolated.

Only positions with a target go through the output layer, a chunk at a time, and each chunk's
logits are recomputed in backward instead of kept: with a 128k vocabulary the full
(tokens x vocab) fp32 logits would otherwise be the largest tensor of the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sft.errors import SFTError
from sft.model import causal_lm
from sft.templating import IGNORE_INDEX


def _chunk_loss_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


class ChunkedLossLM(nn.Module):
    """Wraps a (possibly LoRA-injected) causal LM; forward returns the summed token loss of a micro-batch.

    The sum, not the mean: the loop divides by the target-token count of the whole global batch,
    which is what makes the gradient independent of how the batch is split.
    This module is also the root that FSDP shards, so calling the decoder and the output layer
    from here keeps their parameters under FSDP's hooks.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    @property
    def lm(self) -> nn.Module:
        return causal_lm(self.model)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        # No attention_mask and no cache: with either, transformers stops deriving the per-document
        # mask from position_ids and packed documents silently attend to each other.
        out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False, **attn_kwargs)
        return out.last_hidden_state

    def forward(self, input_ids, position_ids, labels=None, **attn_kwargs) -> torch.Tensor:
        """Summed token loss; without labels, the full logits (small inputs only: the probe and tests)."""
        hidden = self.hidden_states(input_ids, position_ids, **attn_kwargs)
        if labels is None:
            return self.lm.get_output_embeddings()(hidden).float()
        target_mask = labels != IGNORE_INDEX
        h = hidden[target_mask]
        y = labels[target_mask]
        lm_head = self.lm.get_output_embeddings()
        total = hidden.sum() * 0.0  # keeps the graph (and FSDP's backward hooks) alive when no target is present
        for start in range(0, h.shape[0], self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss_sum, lm_head, h[sl], y[sl], use_reentrant=False)
            else:
                total = total + _chunk_loss_sum(lm_head, h[sl], y[sl])
        return total

    def logits(self, input_ids, position_ids, **attn_kwargs) -> torch.Tensor:
        # Through forward, so that a sharded root gathers its parameters.
        return self(input_ids, position_ids, **attn_kwargs)


def check_document_isolation(module: ChunkedLossLM, vocab_size: int, device, atol: float = 1e-4) -> float:
    """Run two documents packed in one row and each alone; refuse to train if the packed logits differ.

    The isolation depends on details (no attention_mask, cache off, backend) that a library
    upgrade or a model's custom code can change without a warning, so every packed run proves it.
    """
    gen = torch.Generator().manual_seed(1234)
    a = torch.randint(3, vocab_size, (7,), generator=gen)
    b = torch.randint(3, vocab_size, (5,), generator=gen)
    packed_ids = torch.cat([a, b])[None].to(device)
    packed_pos = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        packed = module.logits(packed_ids, packed_pos)[0]
        alone_a = module.logits(a[None].to(device), torch.arange(7)[None].to(device))[0]
        alone_b = module.logits(b[None].to(device), torch.arange(5)[None].to(device))[0]
    module.train(was_training)
    diff = max((packed[:7] - alone_a).abs().max().item(), (packed[7:] - alone_b).abs().max().item())
    if not diff <= atol:
        raise SFTError(
            f"packed documents attend to each other (logit difference {diff:.3g} > {atol}) with "
            f"attn_implementation={module.lm.config._attn_implementation!r}; refusing to train packed. "
            "Use packing=off or a backend that isolates documents."
        )
    return diff
