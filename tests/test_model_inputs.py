"""The model comes from the checkpoint; model inputs that cannot work are refused in one line.

With model.path set, every config field of the model (and of the meta-device skeleton that sharded
engines fill from rank 0) comes from the checkpoint's config.json: a Llama-3.1-style rope_scaling
survives, and the `arch` values of the model group are not used. Bad model inputs (issue 13) fail
through the CLI with exit code 2, one line naming the key or file, and an existing run untouched.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import FAST_RUN, TOKENIZER_DIR, compose, run_cli, snapshot
from sft.errors import SFTError
from sft.model import build_hf_config, build_model, build_skeleton, reinit_nonpersistent_buffers, validate_model_config

# A Llama-3.1-style checkpoint, small: rope scaling of type llama3 and a context length of its own.
CHECKPOINT_ARCH = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 256})


def _rope_type(hf_config) -> str:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return params.get("rope_type", "default")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("llama31-like")
    hf_config = AutoConfig.for_model("llama", **CHECKPOINT_ARCH)
    assert _rope_type(hf_config) == "llama3"
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(path)
    return path


def _cfg(path):
    cfg = compose(["model=tiny", f"model.path={path}"]).model  # tiny's arch (hidden 128, 4 layers) must be ignored
    return cfg


def test_every_config_field_comes_from_the_checkpoint(checkpoint):
    cfg = _cfg(checkpoint)
    for hf_config in (build_hf_config(cfg), build_skeleton(cfg).config):
        assert hf_config.hidden_size == 64 and hf_config.num_hidden_layers == 2
        assert _rope_type(hf_config) == "llama3" and hf_config.max_position_embeddings == 2048


def test_meta_skeleton_filled_from_checkpoint_equals_the_checkpoint(checkpoint, tokenizer):
    """What FSDP2 does: meta skeleton -> empty -> rank 0's weights -> buffers rebuilt. The logits are the
    checkpoint's own only if the skeleton kept its rope scaling (measured: the default rope gives logits
    2.6e-3 away here, 260x the tolerance)."""
    from transformers import AutoModelForCausalLM

    want_model = AutoModelForCausalLM.from_pretrained(checkpoint)
    skeleton = build_model(_cfg(checkpoint), tokenizer, device="meta")
    skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(want_model.state_dict())
    reinit_nonpersistent_buffers(skeleton, "cpu")
    ids = torch.randint(3, 260, (1, 300), generator=torch.Generator().manual_seed(0))  # past original_max_position_embeddings
    with torch.no_grad():
        assert torch.allclose(skeleton(input_ids=ids).logits, want_model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_config_overrides_are_explicit_changes(checkpoint):
    cfg = _cfg(checkpoint)
    cfg.config_overrides = {"max_position_embeddings": 4096}
    assert build_hf_config(cfg).max_position_embeddings == 4096
    cfg.config_overrides = {"no_such_field": 1}
    with pytest.raises(SFTError, match=r"model\.config_overrides\.no_such_field: LlamaConfig has no such field"):
        build_hf_config(cfg)


def test_max_length_is_checked_against_the_checkpoint_not_arch(checkpoint):
    cfg = compose(["model=tiny", f"model.path={checkpoint}"])
    validate_model_config(cfg.model, cfg.peft, packing_on=True, max_length=2048)
    with pytest.raises(SFTError, match=r"data\.max_length=3000 is above the model's max_position_embeddings=2048"):
        validate_model_config(cfg.model, cfg.peft, packing_on=True, max_length=3000)


# ---- bad model inputs through the CLI -------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _corrupt_checkpoint(d):
    (d / "ckpt").mkdir()
    (d / "ckpt" / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,\n')
    return [f"model.path={d / 'ckpt'}"]


def _config_only(d):
    (d / "ckpt").mkdir()
    (d / "ckpt" / "model.safetensors").write_bytes(b"")
    return [f"model.path={d / 'ckpt'}"]


CASES = {
    "model_path_missing": (lambda d: [f"model.path={d / 'no-such-model'}"], r"model\.path=\S*no-such-model: no such directory"),
    "model_path_relative_missing": (lambda d: ["model.path=./models/llama-3-8b"], r"model\.path=\./models/llama-3-8b: no such directory"),
    "config_json_corrupt": (_corrupt_checkpoint, r"ckpt/config\.json: not valid JSON .*re-download or repair"),
    "config_json_missing": (_config_only, r"model\.path=\S*ckpt: no config\.json in it"),
    "tokenizer_missing": (lambda d: [f"model.tokenizer={d / 'tok'}"], r"model\.tokenizer=\S*tok: no such directory"),
    "chat_template_missing": (lambda d: [f"model.chat_template={d / 'chatml.jinja'}"],
                              r"model\.chat_template=\S*chatml\.jinja: no such file.*llama3\.jinja"),
    "lora_targets_match_nothing": (lambda d: ["peft=lora", "peft.target_modules=[q_proj,qkv_proj]"],
                                   r"peft\.target_modules: qkv_proj match no linear layer of the model; its linear layers are "
                                   r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    "lora_rank_zero": (lambda d: ["peft=lora", "peft.r=0"], r"peft\.r=0: the LoRA rank must be a positive integer"),
    "lora_rank_negative": (lambda d: ["peft=lora", "peft.r=-8"], r"peft\.r=-8: the LoRA rank must be a positive integer"),
    "max_length_over_context": (lambda d: ["data.max_length=8192"],
                                r"data\.max_length=8192 is above the model's max_position_embeddings=4096"),
    "pad_token_not_in_vocab": (lambda d: ["model.pad_token='<|reserved_special_token_0|>'"],
                               r"model\.pad_token='<\|reserved_special_token_0\|>' is not a token of tokenizer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_input_is_one_line_and_touches_nothing(case, tmp_path, existing_run):
    make_args, pattern = CASES[case]
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    before = snapshot(existing_run)
    args = make_args(tmp_path)
    length = [] if any(a.startswith("data.max_length=") for a in args) else ["data.max_length=256"]
    res = run_cli([*FAST_RUN, "data=jsonl", f"data.path={data}", *length, *args, f"run.output_dir={existing_run}"], timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert re.search(pattern, res.stderr), res.stderr[-2000:]
    assert snapshot(existing_run) == before
