"""The real model configs build on the meta device (no download) with their published parameter counts."""

from __future__ import annotations

import pytest

from conftest import compose
from sft.model import build_skeleton

# Parameter counts of the released checkpoints.
PARAMS = {
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "qwen2_5_7b": 7_615_616_512,
    "mistral_7b": 7_248_023_552,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_real_architectures_on_meta_device(name):
    cfg = compose([f"model={name}"]).model
    assert cfg.path and cfg.dtype == "bfloat16"
    model = build_skeleton(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_tiny_model_uses_shipped_tokenizer(tokenizer):
    cfg = compose(["model=tiny"]).model
    from sft.model import build_tokenizer

    tok = build_tokenizer(cfg)
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= cfg.arch["vocab_size"]
    assert "<|im_start|>" in tok.chat_template
