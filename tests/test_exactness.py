"""Packing and batch splitting never change the loss or the gradients."""

from __future__ import annotations

import datasets
import pytest
import torch

from conftest import tiny_model
from sft.data import Split
from sft.errors import SFTError
from sft.loader import collate
from sft.loss import ChunkedLossLM, check_document_isolation
from sft.optim import OptimConfig
from sft.packing import best_fit_decreasing, plan_epoch
from sft.parallel import Engine, ParallelConfig, precision_of
from sft.templating import IGNORE_INDEX
from sft.step import accumulate_gradients


def make_split(lengths, vocab=260, seed=0) -> Split:
    """Documents of random tokens; the first third of each is 'prompt' (untrained)."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for n in lengths:
        doc = torch.randint(3, vocab, (n,), generator=g).tolist()
        cut = n // 3
        ids.append(doc)
        labels.append([IGNORE_INDEX] * cut + doc[cut:])
    n_target = [sum(1 for x in lab[1:] if x != IGNORE_INDEX) for lab in labels]
    table = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "num_tokens": list(lengths), "num_target": n_target})
    return Split(table)


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def per_token_losses(module, mb):
    logits = module.logits(mb.input_ids, mb.position_ids)
    mask = mb.labels != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[mask], mb.labels[mask], reduction="none")


def test_packed_equals_unpacked_losses_and_gradients(tokenizer):
    lengths = [23, 9, 31, 14, 5, 17]
    split = make_split(lengths)
    module = ChunkedLossLM(tiny_model(tokenizer), chunk_size=16)
    pad = tokenizer.pad_token_id
    # Packed: best-fit-decreasing rows of <= 40 tokens, several documents per row.
    rows = best_fit_decreasing(split.lengths, 40)
    assert any(len(r) > 1 for r in rows)
    packed = collate(rows, split, pad)
    # Unpacked: one document per row (padded).
    single = collate([[i] for i in range(len(lengths))], split, pad)
    assert packed.num_target == single.num_target
    # Same per-token losses, matched document by document.
    lp = per_token_losses(module, packed)
    lu = per_token_losses(module, single)
    assert torch.allclose(lp.sort().values, lu.sort().values, atol=1e-5, rtol=0)
    assert torch.allclose(lp.sum(), lu.sum(), atol=1e-4, rtol=0)
    # Same gradients of the summed loss.
    module.zero_grad()
    module(**packed.model_inputs(), labels=packed.labels).backward()
    g_packed = grads(module)
    module.zero_grad()
    module(**single.model_inputs(), labels=single.labels).backward()
    g_single = grads(module)
    for name in g_single:
        assert torch.allclose(g_packed[name], g_single[name], atol=2e-5, rtol=1e-4), name


def test_chunked_loss_equals_full_cross_entropy(tokenizer):
    split = make_split([40, 33, 12])
    module = ChunkedLossLM(tiny_model(tokenizer), chunk_size=7)
    mb = collate([[0], [1, 2]], split, tokenizer.pad_token_id)
    full = module.lm(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits.float()
    mask = mb.labels != IGNORE_INDEX
    want = torch.nn.functional.cross_entropy(full[mask], mb.labels[mask], reduction="sum")
    assert torch.allclose(module(**mb.model_inputs(), labels=mb.labels), want, rtol=1e-6, atol=1e-4)


def test_labels_never_cross_document_boundaries(tokenizer):
    split = make_split([6, 6])
    mb = collate([[0, 1]], split, tokenizer.pad_token_id)
    # The last token of document 0 predicts nothing (not the first token of document 1).
    assert mb.labels[0, 5] == IGNORE_INDEX
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]


class LeakyLossLM(ChunkedLossLM):
    """Passes an all-ones attention mask: transformers then stops isolating packed documents."""

    def hidden_states(self, input_ids, position_ids, **kw):
        return self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                     attention_mask=torch.ones_like(input_ids), use_cache=False).last_hidden_state


def test_isolation_probe_passes_and_fails_loudly_when_broken(tokenizer):
    model = tiny_model(tokenizer)
    assert check_document_isolation(ChunkedLossLM(model), len(tokenizer), "cpu") < 1e-4
    with pytest.raises(SFTError, match="attend to each other"):
        check_document_isolation(LeakyLossLM(model), len(tokenizer), "cpu")


@pytest.mark.parametrize("packing", ["bfd", "off"])
def test_accumulation_invariance(tokenizer, packing):
    """One optimizer step over the same 4 global rows as 1x4, 2x2 and 4x1 micro-batches: same loss and gradients."""
    lengths = [30, 12, 25, 8, 19, 27, 6, 14, 22]
    split = make_split(lengths, seed=3)
    rows = best_fit_decreasing(split.lengths, 48) if packing == "bfd" else [[i] for i in range(4)]
    rows = rows[:4]
    results = []
    for micro_rows in (4, 2, 1):
        plan = plan_epoch(rows, split.lengths, seed=0, epoch=0, global_rows=4, micro_rows=micro_rows)
        micro = [collate(r, split, tokenizer.pad_token_id) for r in plan.micro_batches(0, rank=0, world=1)]
        assert len(micro) == 4 // micro_rows
        engine = Engine(ChunkedLossLM(tiny_model(tokenizer)), precision_of(ParallelConfig(), "float32"), OptimConfig(), 10,
                        torch.device("cpu"), world=1, ddp=False)
        totals = accumulate_gradients(engine, micro)
        results.append((totals.global_loss(), totals.targets, grads(engine.module)))
    base_loss, base_targets, base_grads = results[0]
    for loss, targets, g in results[1:]:
        assert targets == base_targets
        assert loss == pytest.approx(base_loss, abs=1e-6)
        for name, t in base_grads.items():
            assert torch.allclose(g[name], t, atol=1e-6, rtol=1e-5), name


def test_activation_checkpointing_keeps_gradients(tokenizer):
    split = make_split([30, 22, 17])
    mb = collate([[0, 1], [2]], split, tokenizer.pad_token_id)
    results = []
    for checkpointing in (False, True):
        model = tiny_model(tokenizer)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_activation_checkpointing
        module = ChunkedLossLM(model).train()
        module(**mb.model_inputs(), labels=mb.labels).backward()
        results.append(grads(module))
    for name, g in results[0].items():
        assert torch.allclose(results[1][name], g, atol=1e-6, rtol=1e-5), name
