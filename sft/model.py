"""Build the tokenizer and the causal LM: from a checkpoint, from config values, or on the meta device.

Also the two things that decide whether packed training is exact: which attention backends may
see packed rows, and the start-up probe that proves documents do not attend to each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from sft.errors import SFTError

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parent / "assets"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Backends that keep packed documents apart: dense ones through the block-diagonal mask that
# transformers derives from restarting position_ids, flash ones through varlen cu_seqlens.
PACKING_SAFE_BACKENDS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3")


@dataclass
class ModelConfig:
    name: str = "tiny"
    path: Optional[str] = None  # hub id or local directory; None builds the model from `arch`
    tokenizer: Optional[str] = None  # defaults to `path`
    model_type: str = "llama"
    arch: Dict[str, Any] = field(default_factory=dict)  # transformers config values (also used by the preflight)
    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype parameters are loaded in
    attn_implementation: str = "sdpa"
    chat_template: Optional[str] = None  # a .jinja file that replaces the tokenizer's template
    eot_token: Optional[str] = None  # end-of-turn token; detected from the template when unset
    trust_remote_code: bool = False
    activation_checkpointing: bool = False
    init_seed: int = 0  # weights of a model built from `arch`


@dataclass
class PeftConfig:
    method: str = "none"  # none | lora | qlora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def asset_path(name: str) -> str:
    return str(ASSETS / name)


def validate_model_config(cfg: ModelConfig, peft: PeftConfig, packing_on: bool) -> None:
    if cfg.dtype not in DTYPES:
        raise SFTError(f"model.dtype={cfg.dtype!r}: expected one of {', '.join(DTYPES)}")
    if packing_on and cfg.attn_implementation not in PACKING_SAFE_BACKENDS:
        raise SFTError(
            f"model.attn_implementation={cfg.attn_implementation!r} cannot keep packed documents apart; "
            f"use one of {', '.join(PACKING_SAFE_BACKENDS)} or packing=off"
        )
    if cfg.attn_implementation in VARLEN_BACKENDS:
        if not torch.cuda.is_available():
            raise SFTError(f"model.attn_implementation={cfg.attn_implementation} needs a CUDA GPU; use sdpa here")
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise SFTError("flash-attn is not installed: pip install 'sft[flash]', or use model.attn_implementation=sdpa") from None
    if cfg.path is None and not cfg.arch:
        raise SFTError("model: set model.path (a checkpoint) or model.arch (config values to build from)")
    if peft.method not in ("none", "lora", "qlora"):
        raise SFTError(f"peft.method={peft.method!r}: expected none, lora or qlora")
    if peft.method == "qlora" and not torch.cuda.is_available():
        raise SFTError("peft=qlora needs bitsandbytes 4-bit kernels on a CUDA GPU; use peft=lora on this machine")


def build_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.path
    if source is None:
        raise SFTError("model.tokenizer is not set and there is no model.path to take it from")
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise SFTError(f"model.tokenizer={source!r} cannot be loaded: {exc}") from None
    if cfg.chat_template:
        tok.chat_template = Path(cfg.chat_template).read_text()
    if tok.pad_token_id is None:
        raise SFTError(f"tokenizer {source!r} has no pad token; add one (pad must differ from eos, or eos is masked away)")
    if tok.pad_token_id == tok.eos_token_id:
        raise SFTError(f"tokenizer {source!r}: pad token == eos token; a distinct pad token keeps eos trainable")
    return tok


def build_hf_config(cfg: ModelConfig, tokenizer=None):
    from transformers import AutoConfig

    if cfg.path is not None and not cfg.arch:
        hf_config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    else:
        hf_config = AutoConfig.for_model(cfg.model_type, **dict(cfg.arch))
    if tokenizer is not None:
        if len(tokenizer) > hf_config.vocab_size:
            raise SFTError(f"model.arch.vocab_size={hf_config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
        hf_config.pad_token_id = tokenizer.pad_token_id
        hf_config.eos_token_id = tokenizer.eos_token_id
        hf_config.bos_token_id = tokenizer.bos_token_id
    return hf_config


def _quantization(quantize_4bit: bool, dtype: torch.dtype) -> dict:
    """QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only; refused earlier elsewhere)."""
    if not quantize_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)}


def build_model(cfg: ModelConfig, tokenizer, device: str | torch.device = "cpu", quantize_4bit: bool = False):
    """The causal LM in cfg.dtype, on `device` ("meta" builds the skeleton without allocating weights)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    if quantize_4bit and cfg.path is None:
        raise SFTError("peft=qlora quantises pretrained weights: set model.path")
    if cfg.path is not None and str(device) != "meta":
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
            **_quantization(quantize_4bit, dtype),
        )
    else:
        # On "meta" this is the skeleton that a sharded engine fills from rank 0's copy.
        hf_config = build_hf_config(cfg, tokenizer if cfg.path is None else None)
        torch.manual_seed(cfg.init_seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attn_implementation, dtype=dtype)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        # Per decoder layer, non-reentrant (works with frozen LoRA bases and with FSDP2).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_skeleton(cfg: ModelConfig):
    """The architecture on the meta device from config values alone: no download, no memory, any machine.

    For counting and the preflight only, so the attention backend is the one every machine has.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(build_hf_config(cfg), attn_implementation="sdpa", dtype=DTYPES[cfg.dtype])


def apply_peft(model, cfg: PeftConfig):
    if cfg.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def reinit_nonpersistent_buffers(module: torch.nn.Module, device) -> None:
    """Recompute buffers that are not in any state dict (rotary inv_freq) after meta -> to_empty.

    They are derived from the config, so a fresh instance of the owning module recomputes them;
    left alone they hold uninitialised memory and the loss is silently wrong.
    """
    for name, sub in module.named_modules():
        stale = [b for b in getattr(sub, "_non_persistent_buffers_set", ()) if getattr(sub, b, None) is not None]
        if not stale:
            continue
        if not hasattr(sub, "config"):
            raise SFTError(f"{name} ({type(sub).__name__}) has non-persistent buffers {stale} that cannot be rebuilt after meta init")
        with torch.device("cpu"):
            fresh = type(sub)(sub.config)
        for b in stale:
            getattr(sub, b).copy_(getattr(fresh, b).to(device))


def causal_lm(model):
    """The transformers causal LM inside an optional PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
