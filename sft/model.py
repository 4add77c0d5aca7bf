"""Build the tokenizer and the causal LM: from a checkpoint, from config values, or on the meta device.

Also the two things that decide whether packed training is exact: which attention backends may
see packed rows, and the start-up probe that proves documents do not attend to each other.
"""

from __future__ import annotations

import json
import logging
import os
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
    # With `path` unset: the transformers config values the model is built from. With `path` set, the
    # checkpoint's config.json decides every field and these values are only a stand-in for what runs
    # without the checkpoint at hand (the meta-device preflight of a Hub id that is not downloaded).
    arch: Dict[str, Any] = field(default_factory=dict)
    # Explicit changes to the checkpoint's config.json (or to `arch`), e.g. a longer max_position_embeddings.
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # The padding token when the tokenizer has none or pads with eos (Llama-3, Mistral, Qwen2.5 base): an
    # unused special token of the vocabulary, never eos or the end-of-turn token (those must stay trainable).
    pad_token: Optional[str] = None
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


def _looks_local(source: str) -> bool:
    """A filesystem path rather than a Hub id ("org/name"): absolute, relative with ./ or ~, or deeper than org/name."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.path.exists(source)


def _check_source(key: str, source: Optional[str]) -> None:
    if source is not None and _looks_local(source) and not Path(source).expanduser().exists():
        raise SFTError(f"{key}={source}: no such directory; give a local checkpoint directory or a Hub id (org/name)")


def _checkpoint_config_dict(cfg: ModelConfig) -> Optional[dict]:
    """config.json of a local model.path, checked; None for a Hub id (read by transformers when needed)."""
    if cfg.path is None or not _looks_local(cfg.path):
        return None
    _check_source("model.path", cfg.path)
    file = Path(cfg.path).expanduser() / "config.json"
    if not file.is_file():
        raise SFTError(f"model.path={cfg.path}: no config.json in it; point model.path at a Hugging Face model directory")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SFTError(f"{file}: not valid JSON ({exc}); re-download or repair the checkpoint's config.json") from None
    if not isinstance(values, dict):
        raise SFTError(f"{file}: expected a JSON object of config values; re-download or repair it")
    return values


def context_length(cfg: ModelConfig) -> Optional[int]:
    """max_position_embeddings of the model the run builds (checkpoint or arch, with config_overrides); offline."""
    hf_config = _offline_config(cfg)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def _check_peft(cfg: ModelConfig, peft: PeftConfig) -> None:
    if peft.method == "none":
        return
    if peft.r < 1:
        raise SFTError(f"peft.r={peft.r}: the LoRA rank must be a positive integer (e.g. peft.r=16)")
    if peft.alpha <= 0:
        raise SFTError(f"peft.alpha={peft.alpha} must be positive (the adapters are scaled by alpha / r; e.g. 2 x peft.r)")
    if not 0.0 <= peft.dropout < 1.0:
        raise SFTError(f"peft.dropout={peft.dropout} must be in [0, 1)")
    if not peft.target_modules:
        raise SFTError("peft.target_modules is empty; name the linear layers to adapt (e.g. [q_proj,v_proj])")
    # Every name must match a layer, as PEFT matches them (the full module name, or its last dotted parts):
    # PEFT itself only fails when no name matches, so a typo in one of seven names would silently train
    # fewer adapters. Checked on the meta-device skeleton: no weights are read.
    modules = dict(_meta_model(cfg).named_modules())
    leaves = [name for name, mod in modules.items() if name and not any(True for _ in mod.children())]
    missing = [t for t in peft.target_modules if not any(n == t or n.endswith("." + t) for n in leaves)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)})
        raise SFTError(f"peft.target_modules: {', '.join(missing)} match no linear layer of the model; "
                       f"its linear layers are {', '.join(linear)}")


def validate_model_config(cfg: ModelConfig, peft: PeftConfig, packing_on: bool, max_length: Optional[int] = None) -> None:
    """Everything about the model that can be checked before it is built (no weights are read)."""
    _check_source("model.path", cfg.path)
    _check_source("model.tokenizer", cfg.tokenizer)
    if cfg.chat_template and not Path(cfg.chat_template).expanduser().is_file():
        raise SFTError(f"model.chat_template={cfg.chat_template}: no such file; give a .jinja chat template file "
                       f"(shipped ones: {', '.join(sorted(p.name for p in (ASSETS / 'templates').glob('*.jinja')))} in {ASSETS / 'templates'})")
    if cfg.pad_token is not None and not cfg.pad_token:
        raise SFTError("model.pad_token is empty; name an unused special token of the tokenizer, or leave it unset")
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
    limit = context_length(cfg)
    if max_length is not None and limit is not None and max_length > limit:
        raise SFTError(f"data.max_length={max_length} is above the model's max_position_embeddings={limit} (positions it "
                       f"never saw); lower data.max_length, or raise model.config_overrides.max_position_embeddings knowingly")
    _check_peft(cfg, peft)


def build_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.path
    if source is None:
        raise SFTError("model.tokenizer is not set and there is no model.path to take it from")
    key = "model.tokenizer" if cfg.tokenizer else "model.path"
    _check_source(key, source)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SFTError(f"{key}={source}: the tokenizer cannot be loaded ({first})") from None
    if cfg.chat_template:
        try:
            tok.chat_template = Path(cfg.chat_template).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SFTError(f"model.chat_template={cfg.chat_template}: cannot be read ({exc})") from None
    if cfg.pad_token:
        _set_pad_token(tok, cfg, source)
    elif tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        why = "has no pad token" if tok.pad_token_id is None else f"pads with its eos token {tok.eos_token!r}"
        raise SFTError(f"tokenizer {source} {why}; set model.pad_token to an unused special token of its vocabulary "
                       f"(never eos, which must stay trainable){_pad_suggestion(tok)}")
    return tok


def _set_pad_token(tok, cfg: ModelConfig, source: str) -> None:
    """Pad with an existing token: adding one would change the vocabulary, so the embeddings would no longer match."""
    pad_id = tok.convert_tokens_to_ids(cfg.pad_token)
    if pad_id is None or (pad_id == tok.unk_token_id and cfg.pad_token != tok.unk_token):
        raise SFTError(f"model.pad_token={cfg.pad_token!r} is not a token of tokenizer {source}{_pad_suggestion(tok)}")
    forbidden = {tok.eos_token_id: "its eos token"}
    if cfg.eot_token:
        forbidden[tok.convert_tokens_to_ids(cfg.eot_token)] = "the end-of-turn token (model.eot_token)"
    if pad_id in forbidden:
        raise SFTError(f"model.pad_token={cfg.pad_token!r} is {forbidden[pad_id]}, which must stay trainable; "
                       f"pick an unused special token{_pad_suggestion(tok)}")
    tok.pad_token = cfg.pad_token


def _pad_suggestion(tok) -> str:
    """An unused-looking special token of this vocabulary to name in the message, if there is an obvious one."""
    specials = [t.content for _, t in sorted(getattr(tok, "added_tokens_decoder", {}).items())]
    for hint in ("pad", "reserved", "control", "unused"):
        found = [t for t in specials if hint in t.lower() and t not in (tok.eos_token, tok.bos_token)]
        if found:
            return f", e.g. model.pad_token='{found[0]}'"
    return ""


def build_hf_config(cfg: ModelConfig, tokenizer=None):
    from transformers import AutoConfig

    if cfg.path is not None:
        # Every field from the checkpoint (rope_scaling, sliding windows, ...): a skeleton built from
        # anything else would not match the weights that rank 0 loads into it.
        _checkpoint_config_dict(cfg)  # a missing or corrupt config.json is one clear line, not a traceback
        try:
            hf_config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SFTError(f"model.path={cfg.path}: its config.json cannot be loaded ({first})") from None
    else:
        hf_config = AutoConfig.for_model(cfg.model_type, **dict(cfg.arch))
    _apply_overrides(hf_config, cfg)
    if tokenizer is not None:
        if len(tokenizer) > hf_config.vocab_size:
            raise SFTError(f"model.arch.vocab_size={hf_config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
        hf_config.pad_token_id = tokenizer.pad_token_id
        hf_config.eos_token_id = tokenizer.eos_token_id
        hf_config.bos_token_id = tokenizer.bos_token_id
    return hf_config


def _apply_overrides(hf_config, cfg: ModelConfig) -> None:
    for key, value in dict(cfg.config_overrides).items():
        if not hasattr(hf_config, key):
            raise SFTError(f"model.config_overrides.{key}: {type(hf_config).__name__} has no such field")
        setattr(hf_config, key, value)


def _offline_config(cfg: ModelConfig):
    """The checkpoint's config for counting and planning, never from the network: a local directory, the
    Hugging Face cache, or -- for a Hub id not downloaded here -- `arch` as its stand-in (logged)."""
    from transformers import AutoConfig

    if cfg.path is None or _looks_local(cfg.path):
        return build_hf_config(cfg)
    try:
        hf_config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        if not cfg.arch:
            raise SFTError(f"model.path={cfg.path} is not downloaded here and model.arch is empty: download it "
                           "(huggingface-cli download) or give model.arch values") from None
        log.info("model.path=%s is not downloaded here: model.arch stands in for its config.json", cfg.path)
        hf_config = AutoConfig.for_model(cfg.model_type, **dict(cfg.arch))
    _apply_overrides(hf_config, cfg)
    return hf_config


def _meta_model(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_offline_config(cfg), attn_implementation="sdpa")


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
            cfg.path, config=build_hf_config(cfg), dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code, **_quantization(quantize_4bit, dtype),
        )
        if not quantize_4bit and str(device) != "cpu":  # 4-bit weights are placed by their device_map
            model.to(device)
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
        return AutoModelForCausalLM.from_config(_offline_config(cfg), attn_implementation="sdpa", dtype=DTYPES[cfg.dtype])


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
