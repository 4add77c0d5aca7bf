"""Target-only, chunked cross-entropy, and the probe that proves packed documents are isolated.

Only positions with a target go through the output layer, a chunk at a time, and each chunk's
logits are recomputed in backward instead of kept: with a 128k vocabulary the full
(tokens x vocab) fp32 logits would otherwise be the largest tensor of the step. The chunk is sized
in bytes for the model's vocabulary, so a 151k-vocabulary model holds no more logits than a small one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sft.errors import SFTError
from sft.model import causal_lm
from sft.templating import IGNORE_INDEX

# Bytes one target token costs in a chunk at its peak: fp32 logits, their log-softmax and, in
# backward, the fp32 gradient of the logits (the compute-dtype copies are smaller than any of these).
LOGIT_BYTES_PER_VOCAB_ENTRY = 3 * 4


def loss_chunk_tokens(vocab_size: int, budget_mb: float) -> int:
    """Target tokens per output-layer chunk so that one chunk's logits stay within `budget_mb`."""
    return max(16, int(budget_mb * 2**20) // (LOGIT_BYTES_PER_VOCAB_ENTRY * vocab_size))


def chunks_needed(num_target: int, chunk_tokens: int) -> int:
    return max(1, math.ceil(num_target / chunk_tokens))


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

    def forward(self, input_ids, position_ids, labels=None, target_index=None, num_chunks=None, **attn_kwargs) -> torch.Tensor:
        """Summed token loss; without labels, the full logits (small inputs only: the probe and tests).

        `target_index`: positions (in the flattened batch) that have a target, computed on the host
        by the loader, so that selecting them needs no device-to-host synchronisation.
        `num_chunks`: how many output-layer calls to make. Sharded engines gather the output layer's
        weights at every call (ZeRO-3), so all ranks must make the same number of calls even when
        their target counts differ: the loop passes the largest count over ranks; empty chunks are
        real calls on zero rows. Without it, ranks agree here with a collective (eval, tests).
        """
        hidden = self.hidden_states(input_ids, position_ids, **attn_kwargs)
        if labels is None:
            return self.lm.get_output_embeddings()(hidden).float()
        flat_labels = labels.reshape(-1)
        if target_index is None:
            target_index = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        n = int(target_index.shape[0])
        if num_chunks is None:
            num_chunks = agreed_chunk_counts([chunks_needed(n, self.chunk_size)])[0]
        chunk = max(self.chunk_size, math.ceil(n / num_chunks))
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)
        y = flat_labels.index_select(0, target_index)
        lm_head = self.lm.get_output_embeddings()
        total = hidden.sum() * 0.0  # keeps the graph (and FSDP's backward hooks) alive when no target is present
        for c in range(num_chunks):
            sl = slice(c * chunk, (c + 1) * chunk)
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss_sum, lm_head, h[sl], y[sl], use_reentrant=False)
            else:
                total = total + _chunk_loss_sum(lm_head, h[sl], y[sl])
        return total

    def logits(self, input_ids, position_ids, **attn_kwargs) -> torch.Tensor:
        # Through forward, so that a sharded root gathers its parameters.
        return self(input_ids, position_ids, **attn_kwargs)


def agreed_chunk_counts(local: list[int]) -> list[int]:
    """The per-micro-batch maximum over ranks (identity on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(local)
    t = torch.tensor(local, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.cpu().tolist()]


def _known_leak_hint(backend: str, device) -> str:
    """The one leak measured on a GPU so far (bench/gpu_flex_diag.py, H100, torch 2.11, transformers 5.17):
    flex_attention isolates documents with bf16 weights but not under torch.autocast over fp32 weights, which
    is how single-GPU and DDP runs compute in bf16; FSDP2 computes in bf16 without autocast."""
    dev_type = torch.device(device).type
    if backend == "flex_attention" and dev_type == "cuda" and torch.is_autocast_enabled(dev_type):
        return (" (flex_attention under torch.autocast leaks on CUDA; parallelism=fsdp computes in bf16 without "
                "autocast, or use model.attn_implementation=sdpa)")
    return ""


class _ProbeDocs:
    """Four documents shaped like a data split, so the probe goes through the loader's collate."""

    def __init__(self, docs: list[torch.Tensor]):
        self.docs = docs

    def example(self, i: int):
        ids = self.docs[i].numpy()
        return ids, ids.copy()


def check_document_isolation(module: ChunkedLossLM, vocab_size: int, device, varlen: bool = False,
                             numeric: bool = True, atol: float = 1e-4) -> float:
    """Prove that packed documents do not see each other, through the collate + forward path training uses.

    The isolation depends on details (no attention_mask, cache off, backend, varlen arguments) that a
    library upgrade or a model's custom code can change without a warning, so every packed run proves it.
    The criterion holds in any dtype and on any kernel: changing the first document's tokens must leave
    the second document's logits bitwise unchanged (and the reverse, which causality demands). With
    `numeric` (fp32 compute) the packed logits must also equal each document run alone within `atol`;
    in bf16 different kernels for the packed and the alone call differ at bf16 resolution by design.
    Returns the largest packed-vs-alone difference (0.0 when not `numeric`).
    """
    from sft.loader import collate

    gen = torch.Generator().manual_seed(1234)
    a, b = torch.randint(3, vocab_size, (9,), generator=gen), torch.randint(3, vocab_size, (6,), generator=gen)
    a_changed, b_changed = torch.randint(3, vocab_size, (9,), generator=gen), torch.randint(3, vocab_size, (6,), generator=gen)
    docs = _ProbeDocs([a, b, a_changed, b_changed])

    def logits(rows):
        mb = collate(rows, docs, pad_id=0, varlen=varlen)
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.model_inputs().items()}
        out = module.logits(**inputs)
        return out.reshape(-1, out.shape[-1])[: mb.num_tokens]

    was_training = module.training
    module.eval()
    with torch.no_grad():
        ab, a2b, ab2 = logits([[0, 1]]), logits([[2, 1]]), logits([[0, 3]])
        alone = (logits([[0]]), logits([[1]])) if numeric else None
    module.train(was_training)
    backend = module.lm.config._attn_implementation
    if not torch.equal(ab[9:], a2b[9:]):
        raise SFTError(
            f"packed documents attend to each other (changing one document changed the next one's logits by "
            f"{(ab[9:] - a2b[9:]).abs().max().item():.3g}) with attn_implementation={backend!r}; refusing to train packed. "
            "Use packing=off or a backend that isolates documents" + _known_leak_hint(backend, device) + ".")
    if not torch.equal(ab[:9], ab2[:9]):
        raise SFTError(f"attention is not causal with attn_implementation={backend!r}: a later document changed an earlier one's logits")
    if not numeric:
        return 0.0
    diff = max((ab[:9] - alone[0]).abs().max().item(), (ab[9:] - alone[1]).abs().max().item())
    if not diff <= atol:
        raise SFTError(
            f"packed documents attend to each other (logit difference {diff:.3g} > {atol} from each document alone) with "
            f"attn_implementation={backend!r}; refusing to train packed. Use packing=off or a backend that isolates documents.")
    return diff
