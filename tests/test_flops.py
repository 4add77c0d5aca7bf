"""Model FLOPs and MFU: one formula, checked against a model counted by hand."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from sft.flops import attention_pairs, model_flops
from sft.loss import ChunkedLossLM
from sft.metrics import Throughput

ARCH = dict(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def by_hand(h=64, inter=96, layers=3, heads=4, kv=2, vocab=264):
    head = h // heads
    attn = h * heads * head + 2 * h * kv * head + heads * head * h  # q, k, v, o
    mlp = 3 * h * inter  # gate, up, down
    norms = 2 * h
    return layers * (attn + mlp + norms) + h + h * vocab  # + final norm + output layer (no input embedding)


def test_dense_flops_equal_six_times_non_embedding_parameters(tokenizer):
    flops = model_flops(ChunkedLossLM(tiny_model(tokenizer, **ARCH)))
    assert flops.dense_per_token == 6 * by_hand()
    assert flops.attention_per_pair == 3 * 2 * 2 * 3 * 4 * 16


def test_lora_counts_frozen_weights_at_four(tokenizer):
    from sft.model import PeftConfig, apply_peft

    model = apply_peft(tiny_model(tokenizer, **ARCH), PeftConfig(method="lora", r=4, alpha=8, target_modules=["q_proj"]))
    adapters = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert adapters == 3 * (64 * 4 + 4 * 64)
    assert model_flops(ChunkedLossLM(model)).dense_per_token == 4 * by_hand() + 6 * adapters


def test_tied_output_layer_is_counted_once(tokenizer):
    flops = model_flops(ChunkedLossLM(tiny_model(tokenizer, **dict(ARCH, tie_word_embeddings=True))))
    assert flops.dense_per_token == 6 * by_hand()


def test_attention_term_uses_document_lengths_not_rows():
    assert attention_pairs([3, 1]) == 3 * 4 / 2 + 1
    # Two documents of 512 packed in a row of 1024 attend to half the pairs of one 1024-token document.
    assert attention_pairs([512, 512]) < 0.51 * attention_pairs([1024])


def test_mfu_is_tokens_per_gpu_times_flops_per_token_over_peak(tokenizer):
    flops = model_flops(ChunkedLossLM(tiny_model(tokenizer, **ARCH)))
    for world in (1, 2, 8):
        meter = Throughput(flops, world, peak_flops_per_gpu=1e12)
        meter.start_step()
        meter.add(tokens=4096 * world, attention_pairs=2 * world * attention_pairs([2048]))
        meter.seconds = 2.0  # a step that took 2 s (set, so the figure is exact)
        out = meter.read()
        per_gpu = 4096 / 2.0
        want = per_gpu * flops.per_token([2048, 2048]) / 1e12
        assert out["tokens_per_s_per_gpu"] == pytest.approx(per_gpu)
        assert out["mfu"] == pytest.approx(want, rel=1e-12)  # the same on every world size for the same work per GPU


def test_probe_in_bf16_uses_the_bitwise_criterion(tokenizer):
    """bf16 compute: packed vs alone differ at bf16 resolution by design, isolation is still proven exactly."""
    from sft.loss import check_document_isolation

    module = ChunkedLossLM(tiny_model(tokenizer).to(torch.bfloat16))
    assert check_document_isolation(module, len(tokenizer), "cpu", numeric=False) == 0.0


def test_chunked_loss_at_a_real_151k_vocabulary_equals_full_cross_entropy(tmp_path):
    """The loss chunk is sized in bytes for the vocabulary: at Qwen2's 151k tokens a small budget means many
    chunks; their sum must equal one full cross-entropy over real token ids (real tokenizer, ragged chunks)."""
    from transformers import AutoTokenizer

    from real_tokenizers import qwen2_tokenizer
    from sft.loss import ChunkedLossLM, chunks_needed, loss_chunk_tokens
    from sft.model import ModelConfig, build_model

    tok = AutoTokenizer.from_pretrained(str(qwen2_tokenizer(tmp_path)))
    vocab = len(tok)
    cfg = ModelConfig(name="t", arch=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    model = build_model(cfg, tok)
    chunk = loss_chunk_tokens(vocab, 1.0)  # 1 MB of logits: the 16-token floor at this vocabulary
    assert chunk == 16
    ids = torch.tensor([tok("Packed rows of real text, tokenised by a real byte-level BPE with 151k entries. " * 3)["input_ids"]])
    labels = ids.clone()
    labels[0, :5] = -100
    n = int((labels != -100).sum())
    assert chunks_needed(n, chunk) >= 3
    module = ChunkedLossLM(model, chunk)
    pos = torch.arange(ids.shape[1])[None]
    got = module(ids, pos, labels=labels)
    logits = module.logits(ids, pos)[0]
    mask = labels[0] != -100
    want = torch.nn.functional.cross_entropy(logits[mask], labels[0][mask], reduction="sum")
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-4)
    # More chunks than needed (what a rank with fewer targets runs to match its peers): same sum.
    assert torch.allclose(module(ids, pos, labels=labels, num_chunks=chunks_needed(n, chunk) + 2), want, rtol=1e-6, atol=1e-4)
