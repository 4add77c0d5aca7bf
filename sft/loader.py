"""Turn planned rows into tensors: padding-free packed rows with per-document positions.

Labels are shifted here, per document, so that the loss never asks the last token of one
document to predict the first token of the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sft.data import Split
from sft.packing import Row
from sft.templating import IGNORE_INDEX


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [rows, T]
    position_ids: torch.Tensor  # [rows, T], restarting at 0 for each document
    labels: torch.Tensor  # [rows, T], already shifted: labels[r, t] is the target of the prediction at (r, t)
    num_tokens: int  # real (non-padding) tokens
    num_target: int
    # Only for varlen kernels (flash attention): cumulative document lengths of the flattened batch.
    attn_kwargs: dict = field(default_factory=dict)
    attention_pairs: int = 0  # sum of l(l+1)/2 over documents: the attention term of the step's FLOPs

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, **self.attn_kwargs}


def _document_pieces(rows: list[Row], split: Split) -> list[list[tuple]]:
    out = []
    for row in rows:
        pieces = []
        for doc in row:
            ids, labels = split.example(doc)
            shifted = torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long)
            shifted[:-1] = torch.as_tensor(labels[1:])
            pieces.append((torch.as_tensor(ids), shifted))
        out.append(pieces)
    return out


def collate(rows: list[Row], split: Split, pad_id: int, varlen: bool = False) -> MicroBatch:
    """Rows stay rows for dense-mask backends: flattening R rows into one would cost (R*T)^2 attention.

    With `varlen` (flash attention), all documents go into a single row with cu_seqlens, since
    the varlen kernel's cost only depends on document lengths.
    """
    pieces = [p for p in _document_pieces(rows, split) if p]
    if not pieces:  # an all-padding micro-batch keeps every rank in lockstep on the last step
        z = torch.full((1, 1), pad_id, dtype=torch.long)
        return MicroBatch(z, torch.zeros_like(z), torch.full_like(z, IGNORE_INDEX), 0, 0)
    if varlen:
        pieces = [[p for row in pieces for p in row]]
    width = max(sum(len(ids) for ids, _ in row) for row in pieces)
    n = len(pieces)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    # Padding positions count up from 0 like a document of their own, so they never look like a
    # continuation of the last real document; being last in the row, causality keeps them invisible.
    position_ids = torch.zeros((n, width), dtype=torch.long)
    doc_lengths = []
    for r, row in enumerate(pieces):
        t = 0
        for ids, lab in row:
            k = len(ids)
            input_ids[r, t : t + k] = ids
            labels[r, t : t + k] = lab
            position_ids[r, t : t + k] = torch.arange(k)
            doc_lengths.append(k)
            t += k
        position_ids[r, t:] = torch.arange(width - t)
    num_tokens = int(sum(doc_lengths))
    attn_kwargs = {}
    if varlen:
        cu = torch.zeros(len(doc_lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(doc_lengths, dtype=torch.int32), 0)
        attn_kwargs = {
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": max(doc_lengths), "max_length_k": max(doc_lengths),
        }
    pairs = sum(k * (k + 1) // 2 for k in doc_lengths)
    return MicroBatch(input_ids, position_ids, labels, num_tokens, int((labels != IGNORE_INDEX).sum()), attn_kwargs, pairs)
