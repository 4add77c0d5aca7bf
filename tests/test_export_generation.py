"""Every exported model stops generating at the end of turn: full final/, the LoRA adapter final/, the merged
model from `sft-export --merge`, and the offline export of a checkpoint each carry a generation config whose
eos_token_id includes the run's end-of-turn token, and use_cache: true.

Generation is checked on weights set by hand so that, after the generation prompt, the model answers
"O", "K", end-of-turn, and then end-of-turn forever: greedy decoding with the exported generation config must
return exactly those three tokens, and with the base's eos alone it would run on to max_new_tokens."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST_RUN, compose, run_cli

pytestmark = pytest.mark.slow  # two tiny CLI runs and two exports: about a minute
ANSWER = ["O", "K"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    full, lora = root / "full", root / "lora"
    common = [*FAST_RUN, "train.max_steps=2", "checkpoint.every=2"]
    for out, extra in ((full, []), (lora, ["peft=lora", "peft.r=4"])):
        res = run_cli([*common, f"run.output_dir={out}", *extra])
        assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli([str(full), "--checkpoint", "LATEST", "--out", str(full / "offline")], module="sft.export")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli([str(lora), "--merge"], module="sft.export")
    assert res.returncode == 0, res.stderr[-3000:]
    return {"full": full, "lora": lora}


def _emit(model, tokenizer, prompt_last: int, eot: int) -> None:
    """Set weights so that each next token depends on the current one only: prompt_last -> O -> K -> eot -> eot.
    With the attention and MLP outputs zeroed, the residual stream at a position is its token's embedding;
    chain tokens get orthogonal embeddings, and the output layer maps each to the next chain token."""
    chain = [prompt_last, *tokenizer.convert_tokens_to_ids(ANSWER), eot]
    lm = model
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.model.norm.weight.fill_(1.0)
        emb, head = lm.model.embed_tokens.weight, lm.lm_head.weight
        k = len(chain)
        emb[:, :k] = 0
        head[:, :k] = 0
        for i, tok in enumerate(chain):
            emb[tok].zero_()
            emb[tok, i] = 10.0
            nxt = chain[min(i + 1, k - 1)]
            head[nxt, i] = 10.0


def _generate(model, tokenizer, gen_config) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say OK."}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    _emit(model, tokenizer, int(ids[0, -1]), _eot(tokenizer))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_config, max_new_tokens=12,
                             do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _eot(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def _check_stops(model, tokenizer, directory):
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(directory)
    eot = _eot(tokenizer)
    assert eot in gen.eos_token_id and tokenizer.eos_token_id in gen.eos_token_id and gen.use_cache
    want = [*tokenizer.convert_tokens_to_ids(ANSWER), eot]
    assert _generate(model, tokenizer, gen) == want
    # The same model with only the base's eos: it runs on past the end of turn (the check can fail).
    gen.eos_token_id = [tokenizer.eos_token_id]
    assert _generate(model, tokenizer, gen) == want + [eot] * 9


@pytest.mark.parametrize("export", ["full/final", "full/offline", "lora/final-merged"])
def test_full_model_exports_stop_at_the_end_of_turn(runs, export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, sub = export.split("/")
    directory = runs[run] / sub
    assert json.loads((directory / "config.json").read_text())["use_cache"] is True
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.use_cache
    _check_stops(model, AutoTokenizer.from_pretrained(directory), directory)


def test_lora_adapter_export_stops_at_the_end_of_turn(runs):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from sft.model import build_model, build_tokenizer

    adapter = runs["lora"] / "final"
    assert not (adapter / "config.json").exists()  # an adapter, not a model
    mcfg = compose([*FAST_RUN, "peft=lora"]).model
    base = build_model(mcfg, build_tokenizer(mcfg))
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    _check_stops(model, AutoTokenizer.from_pretrained(adapter), adapter)
