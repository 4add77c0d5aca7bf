"""Write `final/`: a Hugging Face model directory (or a PEFT adapter directory) that from_pretrained loads.

Also the `sft-export` command: merge a LoRA adapter into its base model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from sft import distributed as D
from sft.errors import SFTError
from sft.model import causal_lm


def _generation_config(lm, tokenizer, eot_id: int):
    gen = lm.generation_config
    gen.eos_token_id = sorted({eot_id, tokenizer.eos_token_id})
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return gen


def export_final(engine, tokenizer, run_dir: Path, eot_id: int) -> Path:
    """Every rank calls this (sharded engines gather collectively); rank 0 writes. Written under a temporary
    name and renamed, so `final/` is either the previous export or the complete new one."""
    state = engine.full_state_dict()  # keys of engine.module.model (the LM or its PEFT wrapper), on rank 0
    final = Path(run_dir) / "final"
    if D.rank() == 0:
        tmp = Path(run_dir) / ".final-partial"
        shutil.rmtree(tmp, ignore_errors=True)
        wrapped = engine.module_for_export()
        lm = causal_lm(wrapped)
        _generation_config(lm, tokenizer, eot_id)
        if wrapped is not lm:  # PEFT: the adapter only; `sft-export --merge` builds the full model
            wrapped.save_pretrained(str(tmp), state_dict=state)
            lm.generation_config.save_pretrained(str(tmp))
        else:
            lm.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    D.barrier()
    return final


def merge_adapter(adapter_dir: Path, out_dir: Path, base: str | None = None) -> Path:
    """Load the base model (from `base`, the adapter's recorded base, or the run's config), apply the adapter, merge."""
    from peft import PeftConfig as HFPeftConfig, PeftModel
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise SFTError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    base_model = _load_base(adapter_dir, base, HFPeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path)
    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    tmp = out_dir.with_name(f".{out_dir.name}-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _load_base(adapter_dir: Path, base: str | None, recorded: str | None):
    """A model built from config values (the tiny model) is rebuilt from the run's config.yaml and seed."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    if base:
        return AutoModelForCausalLM.from_pretrained(base)
    run_config = adapter_dir.parent / "config.yaml"
    if run_config.exists():
        from sft.model import ModelConfig, build_model, build_tokenizer

        raw = OmegaConf.to_container(OmegaConf.load(run_config)["model"], resolve=True)
        mcfg = ModelConfig(**raw)
        return causal_lm(build_model(mcfg, build_tokenizer(mcfg)))
    if recorded:
        return AutoModelForCausalLM.from_pretrained(recorded)
    raise SFTError(f"{adapter_dir}: cannot tell the base model; pass --base")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sft-export", description="Merge a LoRA adapter (a run's final/) into a full Hugging Face model.")
    parser.add_argument("path", help="a run directory or its final/ adapter directory")
    parser.add_argument("--out", help="output directory (default: RUN/final-merged)")
    parser.add_argument("--base", help="base model id or directory (default: from the run's config)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    adapter = path / "final" if (path / "final").is_dir() else path
    out = Path(args.out) if args.out else adapter.parent / "final-merged"
    try:
        merge_adapter(adapter, out, args.base)
    except SFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
