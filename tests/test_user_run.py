"""A user's own run: the demo's settings stay with the demo, and picking your data gives production defaults.

The commands below are the README's (workstation and cluster); each is composed exactly as
`python -m sft.train ...` composes it, and the values the README promises are asserted. The last
test runs the README's 2-process FSDP2 command on a small file with no batch override at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, compose
from sft.config import derive_accumulation
from sft.errors import SFTError

DEMO_PROMPTS = str(REPO / "sft" / "assets" / "demo" / "eval_prompts.jsonl")
# What every run on the user's own data gets unless the command says otherwise.
PRODUCTION = {"run.demo": False, "train.max_steps": -1, "train.micro_batch_size": 1, "train.global_batch_size": 32,
              "eval.prompts_file": None}

# (README command line after `python -m sft.train` / `sbatch slurm/...sh`, expected resolved values)
README_COMMANDS = {
    "demo": ([], {"run.name": "demo", "run.demo": True, "train.max_steps": 150, "train.global_batch_size": 8,
                  "train.micro_batch_size": 8, "optim.lr": 3e-3, "eval.prompts_file": DEMO_PROMPTS, "data.name": "demo"}),
    "experiment=demo": (["experiment=demo"], {"run.name": "demo", "run.demo": True, "train.max_steps": 150, "optim.lr": 3e-3}),
    "tiny on own data": (["model=tiny", "data=jsonl", "data.path=/data/chats.jsonl"],
                         {**PRODUCTION, "run.name": "tiny-jsonl", "optim.lr": 2e-5, "data.max_length": 2048}),
    "llama3_8b full": (["model=llama3_8b", "data=jsonl", "data.path=/data/chats.jsonl"],
                       {**PRODUCTION, "run.name": "llama3_8b-jsonl", "optim.lr": 2e-5, "peft.method": "none",
                        "model.pad_token": "<|reserved_special_token_0|>", "model.eot_token": "<|eot_id|>"}),
    "llama3_8b lora": (["model=llama3_8b", "data=jsonl", "data.path=/data/chats.jsonl", "peft=lora"],
                       {**PRODUCTION, "run.name": "llama3_8b-jsonl", "optim.lr": 2e-4, "peft.method": "lora", "peft.r": 16}),
    "lora, lr given": (["model=llama3_8b", "data=jsonl", "data.path=/data/chats.jsonl", "peft=lora", "optim.lr=1e-4"],
                       {"optim.lr": 1e-4, "peft.method": "lora"}),
    "mixture": (["model=qwen2_5_7b", "data=mixture"], {**PRODUCTION, "run.name": "qwen2_5_7b-mixture", "optim.lr": 2e-5,
                                                         "model.pad_token": "<|fim_pad|>"}),
    "hub": (["model=mistral_7b", "data=hub", "data.path=org/chats", "peft=lora"],
            {**PRODUCTION, "run.name": "mistral_7b-hub", "optim.lr": 2e-4, "model.eot_token": "</s>"}),
    "70b full (sbatch slurm/sft_70b.sh)": (["experiment=llama3_70b_full", "data.path=/data/chats.jsonl"],
                                           {"run.name": "llama3_70b_full", "run.demo": False, "train.max_steps": -1,
                                            "train.micro_batch_size": 1, "train.global_batch_size": 128, "optim.lr": 1e-5,
                                            "eval.prompts_file": None, "parallelism.strategy": "fsdp"}),
    "8b lora (sbatch slurm/sft_lora.sh)": (["experiment=llama3_8b_lora_large", "data.path=/data/chats.jsonl"],
                                           {"run.name": "llama3_8b_lora_large", "run.demo": False, "train.max_steps": -1,
                                            "optim.lr": 2e-4, "peft.method": "lora", "eval.prompts_file": None}),
}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", sorted(README_COMMANDS))
def test_readme_command_composes_to_what_readme_says(name):
    overrides, expected = README_COMMANDS[name]
    cfg = compose(overrides)
    for key, want in expected.items():
        got = _get(cfg, key)
        assert got == (pytest.approx(want, rel=1e-12) if isinstance(want, float) else want), (key, got, want)


def test_no_demo_setting_leaks_into_a_run_on_own_data():
    """Every key the demo sets (conf/data/demo.yaml) takes another value once the data is the user's, except
    the two the demo pins at the production value on purpose (so a change of default does not change the demo)."""
    same_on_purpose = {"optim.warmup_steps", "eval.every"}
    demo = yaml.safe_load((REPO / "conf" / "data" / "demo.yaml").read_text())
    own = compose(["data=jsonl", "data.path=/data/chats.jsonl"])
    demo_cfg = compose([])
    leaked = []
    for section, values in demo.items():
        if section == "data":
            continue
        for key in values:
            if f"{section}.{key}" not in same_on_purpose and _get(own, f"{section}.{key}") == _get(demo_cfg, f"{section}.{key}"):
                leaked.append(f"{section}.{key}")
    assert leaked == [], leaked


def test_data_path_without_a_data_group_is_refused_not_trained_as_the_demo():
    from sft.config import validate

    cfg = compose(["data.path=/data/chats.jsonl"])
    with pytest.raises(SFTError, match="add data=jsonl"):
        validate(cfg, 1)
    validate(compose([]), 1)  # the demo itself passes


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16, 32])
def test_production_batch_works_on_common_process_counts(world):
    train = compose(["data=jsonl", "data.path=/data/chats.jsonl"]).train
    assert derive_accumulation(train, world) * train.micro_batch_size * world == train.global_batch_size


def test_indivisible_batch_says_what_to_set():
    train = compose(["data=jsonl", "data.path=/data/chats.jsonl"]).train
    with pytest.raises(SFTError, match=r"set train.global_batch_size to a multiple of 3 \(e.g. 33\)"):
        derive_accumulation(train, 3)


@pytest.mark.slow
def test_two_process_fsdp_on_own_data_with_no_batch_override(tmp_path):
    """The README's command `torchrun --nproc_per_node 2 -m sft.train model=tiny data=jsonl data.path=F
    parallelism=fsdp`, on 600 short conversations: one whole epoch (one optimizer step of 32 packed rows, some empty,
    16 micro-steps of one row per rank), an evaluation, a checkpoint and the export."""
    src = (REPO / "sft" / "assets" / "demo" / "conversations.jsonl").read_text().splitlines()[:600]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(src) + "\n")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sft.train",
           "model=tiny", "data=jsonl", f"data.path={data}", "parallelism=fsdp", f"run.output_dir={out}"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["micro_batch_size"] == 1 and saved["train"]["global_batch_size"] == 32
    assert saved["run"]["demo"] is False and saved["run"]["name"] == "tiny-jsonl" and saved["optim"]["lr"] == 2e-5
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if "loss" in e]
    assert steps and steps == list(range(1, len(steps) + 1))
    assert any("eval_loss" in e for e in events)
    assert (out / "checkpoints" / "LATEST").exists() and (out / "final" / "config.json").exists()
    assert "demo exact match" not in res.stdout + res.stderr


def test_eval_prompts_come_from_the_eval_split_spread_over_it(tmp_path, tokenizer):
    """With no prompts file (every run but the demo), a generation prompt is an eval conversation cut before
    its first trained token: exactly what the chat template renders as the generation prompt, and the
    reference answer is that assistant turn. Prompts are spread over the split, not taken from its head."""
    from data_helpers import chat, data_config, write_jsonl
    from sft.data import prepare_data
    from sft.evaluate import EvalConfig, load_prompts

    records = [chat(f"question {i}?", f"answer {i}", system="Be brief." if i % 2 else None) for i in range(20)]
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    split = prepare_data(data_config(tmp_path, path), tokenizer, None, None).train
    prompts = load_prompts(EvalConfig(prompts_file=None), split, tokenizer, 4)
    assert len(prompts) == 4
    by_answer = {r["messages"][-1]["content"]: r["messages"][:-1] for r in records}
    for p in prompts:
        want = tokenizer.apply_chat_template(by_answer[p.answer], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert p.ids == list(want["input_ids"])
    positions = sorted(next(i for i in range(len(split)) if split.example(i)[0][: len(p.ids)].tolist() == p.ids) for p in prompts)
    assert positions[0] == 0 and positions[-1] == len(split) - 1  # the first and the last, and two between
