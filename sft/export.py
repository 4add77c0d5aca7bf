"""Hugging Face model directories from training: streamed, sharded safetensors; LoRA adapters and merges.

A 70B model must never be gathered into one process's memory to be saved: tensors arrive one at a
time (from the live sharded model, from a DCP checkpoint, or from a DeepSpeed checkpoint) and are
written into safetensors shards of at most `max_shard_bytes`, with the index transformers reads.
Every output directory is written under a temporary name and renamed when complete.

`sft-export RUN_DIR` writes a Hugging Face model from a run: `--merge` merges the LoRA adapter in
final/, `--checkpoint step-N|LATEST` exports a sharded checkpoint of either backend.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch

from sft import distributed as D
from sft.errors import SFTError
from sft.model import causal_lm

DEFAULT_SHARD_BYTES = 5 * 2**30


class ShardWriter:
    """Collects tensors up to a byte budget per file; file names and index in transformers' layout."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = out_dir
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.out_dir / f".shard-{len(self.files):05d}"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.out_dir / ".shard-00000", self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f".shard-{i:05d}", self.out_dir / fname)
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tensors(tensors: Iterable[tuple[str, torch.Tensor | None]], out_dir: Path, max_shard_bytes: int) -> None:
    """Consume (name, tensor) pairs; only the writing rank gets tensors (others get None and just take part)."""
    writer = ShardWriter(out_dir, max_shard_bytes) if D.rank() == 0 else None
    for name, tensor in tensors:
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.close()


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _eos_ids(*sources) -> list[int]:
    """Every id named by the sources (ints, lists of ints or None), first occurrence first."""
    out: list[int] = []
    for src in sources:
        for i in ([src] if isinstance(src, int) else list(src or [])):
            if i is not None and int(i) not in out:
                out.append(int(i))
    return out


def generation_config_for(base, hf_config, tokenizer, eot_ids: list[int]):
    """The generation config of an exported model: the base model's own (sampling defaults and all) when it
    has one, with every end-of-turn token the run trained added to eos_token_id, so that generation
    stops at the end of the answer; and use_cache on (training turns the cache off, generation needs it)."""
    import copy

    from transformers import GenerationConfig

    gen = copy.deepcopy(base) if base is not None else GenerationConfig.from_model_config(hf_config)
    gen.eos_token_id = _eos_ids(gen.eos_token_id, tokenizer.eos_token_id, *eot_ids)
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.use_cache = True
    return gen


def _inference_config(hf_config):
    """A copy of the model config for inference: training sets use_cache=False on the live model, which
    would make every generation from the export recompute the whole prefix at each token."""
    import copy

    cfg = copy.deepcopy(hf_config)
    cfg.use_cache = True
    return cfg


def _finish_model_dir(tmp: Path, hf_config, tokenizer, eot_id: int | None, base_generation=None) -> None:
    _inference_config(hf_config).save_pretrained(str(tmp))
    gen = generation_config_for(base_generation, hf_config, tokenizer, [eot_id] if eot_id is not None else [])
    gen.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))


def export_final(engine, tokenizer, run_dir: Path, eot_id: int, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """`final/` from the live (possibly sharded) model. Every rank calls this; rank 0 writes."""
    final = Path(run_dir) / "final"
    tmp = Path(run_dir) / ".final-partial"
    wrapped = engine.module_for_export()
    lm = causal_lm(wrapped)
    if D.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if wrapped is not lm:
        # PEFT: the adapter only (small), gathered whole; `sft-export --merge` builds the full model.
        adapter = dict(engine.iter_full_tensors(trainable_only=True))
        if D.rank() == 0:
            wrapped.save_pretrained(str(tmp), state_dict=adapter)
            _finish_model_dir(tmp, lm.config, tokenizer, eot_id, getattr(lm, "generation_config", None))
            (tmp / "config.json").unlink()  # an adapter directory must not look like a full model
    else:
        write_tensors(engine.iter_full_tensors(), tmp, max_shard_bytes)
        if D.rank() == 0:
            _finish_model_dir(tmp, lm.config, tokenizer, eot_id, getattr(lm, "generation_config", None))
    if D.rank() == 0:
        _replace_dir(tmp, final)
    D.barrier()
    return final


# ---------------------------------------------------------------- offline: checkpoints and adapters

def _dcp_tensors(checkpoint: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Model tensors of a DCP checkpoint, read one at a time in this single process (any world size wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    for key, info in meta.items():
        if not key.startswith("model.") or not isinstance(info, TensorStorageMetadata):
            continue
        holder = {key: torch.empty(info.size, dtype=info.properties.dtype)}
        dcp.load(holder, checkpoint_id=str(checkpoint), no_dist=True)
        yield key.removeprefix("model.model."), holder[key]  # "model" entry of the checkpoint, then the loss module's "model."


def _zero3_tensors(checkpoint: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from sft.zero3 import CHECKPOINT_TAG

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=CHECKPOINT_TAG, lazy_mode=True)
    for key, tensor in lazy.items():  # each lazy tensor is assembled from the partitions only when asked for
        yield key.removeprefix("model."), tensor.contiguous()  # keys of the loss module: "model." + the LM's


def export_checkpoint(run_dir: Path, checkpoint: Path, out_dir: Path, max_shard_bytes: int) -> Path:
    """A full Hugging Face model from a sharded training checkpoint, streamed tensor by tensor."""
    from sft.model import ModelConfig, build_hf_config, build_tokenizer

    mcfg = _run_model_config(run_dir)
    peft = _run_section(run_dir, "peft")
    if peft.get("method", "none") != "none":
        raise SFTError(f"{checkpoint} holds a LoRA adapter, not a model: export final/ with --merge instead")
    tokenizer = build_tokenizer(ModelConfig(**mcfg))
    tensors = _zero3_tensors(checkpoint) if (checkpoint / "zero3").is_dir() else _dcp_tensors(checkpoint)
    tmp = out_dir.with_name(f".{out_dir.name}-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tensors(tensors, tmp, max_shard_bytes)
    from sft.templating import resolve_eot_id

    _finish_model_dir(tmp, build_hf_config(ModelConfig(**mcfg), tokenizer), tokenizer, resolve_eot_id(tokenizer, mcfg.get("eot_token")),
                      _base_generation_config(mcfg.get("path")))
    _replace_dir(tmp, out_dir)
    return out_dir


def _base_generation_config(path: str | None):
    """The base checkpoint's generation_config.json, if it has one (a model built from config values has none)."""
    if not path:
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def _run_section(run_dir: Path, key: str) -> dict:
    from omegaconf import OmegaConf

    config = Path(run_dir) / "config.yaml"
    if not config.exists():
        raise SFTError(f"{run_dir}: no config.yaml (not a run directory)")
    return OmegaConf.to_container(OmegaConf.load(config)[key], resolve=True)


def _run_model_config(run_dir: Path) -> dict:
    return _run_section(run_dir, "model")


def merge_adapter(adapter_dir: Path, out_dir: Path, base: str | None = None) -> Path:
    """Base model (from `base`, the run's config, or the adapter's recorded base) + adapter, merged."""
    from peft import PeftConfig as HFPeftConfig, PeftModel
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise SFTError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    base_model = _load_base(adapter_dir, base, HFPeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path)
    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    # The base model's generation config knows nothing of the run's end-of-turn token: take it from the
    # adapter directory (export_final wrote it there) and from the run's config.
    merged.config.use_cache = True  # the base was built for training, with the cache off
    merged.generation_config = generation_config_for(getattr(merged, "generation_config", None), merged.config, tokenizer,
                                                     _trained_eos_ids(adapter_dir, tokenizer))
    tmp = out_dir.with_name(f".{out_dir.name}-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _replace_dir(tmp, out_dir)
    return out_dir


def _trained_eos_ids(adapter_dir: Path, tokenizer) -> list[int]:
    ids: list[int] = []
    if (adapter_dir / "generation_config.json").exists():
        ids += _eos_ids(json.loads((adapter_dir / "generation_config.json").read_text()).get("eos_token_id"))
    if (adapter_dir.parent / "config.yaml").exists():
        from sft.templating import resolve_eot_id

        ids += [resolve_eot_id(tokenizer, _run_model_config(adapter_dir.parent).get("eot_token"))]
    return ids


def _load_base(adapter_dir: Path, base: str | None, recorded: str | None):
    """A model built from config values (the tiny model) is rebuilt from the run's config.yaml and seed."""
    from transformers import AutoModelForCausalLM

    if base:
        return AutoModelForCausalLM.from_pretrained(base)
    if (adapter_dir.parent / "config.yaml").exists():
        from sft.model import ModelConfig, build_model, build_tokenizer

        mcfg = ModelConfig(**_run_model_config(adapter_dir.parent))
        return causal_lm(build_model(mcfg, build_tokenizer(mcfg)))
    if recorded:
        return AutoModelForCausalLM.from_pretrained(recorded)
    raise SFTError(f"{adapter_dir}: cannot tell the base model; pass --base")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sft-export", description=__doc__.split("\n\n")[-1])
    parser.add_argument("run_dir", type=Path, help="a run directory (or a final/ adapter directory with --merge)")
    parser.add_argument("--merge", action="store_true", help="merge the LoRA adapter in final/ into its base model")
    parser.add_argument("--checkpoint", help="export checkpoints/NAME (or LATEST) instead of final/")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN/final-merged or RUN/export-NAME)")
    parser.add_argument("--base", help="base model for --merge (default: from the run's config)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        if args.checkpoint:
            from sft.checkpoint import checkpoint_root, latest_checkpoint

            ckpt = latest_checkpoint(args.run_dir) if args.checkpoint == "LATEST" else checkpoint_root(args.run_dir) / args.checkpoint
            if ckpt is None or not (ckpt / "train_state.json").exists():
                raise SFTError(f"{args.run_dir}: no complete checkpoint {args.checkpoint}")
            out = export_checkpoint(args.run_dir, ckpt, args.out or args.run_dir / f"export-{ckpt.name}", int(args.max_shard_gb * 2**30))
        else:
            adapter = args.run_dir / "final" if (args.run_dir / "final").is_dir() else args.run_dir
            out = merge_adapter(adapter, args.out or adapter.parent / "final-merged", args.base)
    except SFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
