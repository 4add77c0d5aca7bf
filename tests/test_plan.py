"""sft.plan / sft.memory: predictions checked against what the real engines and autograd hold.

- Parameter, gradient and optimizer-state bytes per rank EQUAL the bytes the real FSDP2 and ZeRO-3
  engines hold on 2 processes (sum of distinct local storages, tests/workers/state_bytes.py), for the
  tiny model and a ~100M-parameter model (with a vocabulary not divisible by 2, so FSDP2 pads).
- Saved activations within 25% of the tensors autograd really saves on CPU (saved-tensor hooks).
- Published per-GPU peaks for comparable recipes within 15% (torchtune's table; see the test).
- The CLI: exit 0 and plan.json when it fits, 1 after the full report when not, 2 with sft.train's
  message for a refused combination; check_memory_fits names the skip key.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compose

TINY = ["model=tiny", "data.eval_max=16", "eval.every=0", "run.demo=false"]
# ~99M parameters: 2 x 32001 x 768 embeddings + 8 layers of 6.3M; 32001 rows do not split evenly over 2 ranks.
M100 = ["model.arch.vocab_size=32001", "model.arch.hidden_size=768", "model.arch.intermediate_size=2048",
        "model.arch.num_hidden_layers=8", "model.arch.num_attention_heads=12", "model.arch.num_key_value_heads=4",
        "data.max_length=64", "packing=off", "train.check_isolation=false"]


def _predicted(overrides, world, rank, accumulation):
    from sft.memory import build_architecture, state_for

    cfg = compose(overrides)
    return state_for(build_architecture(cfg), cfg, world, accumulation, rank)


CASES = {
    "fsdp-tiny": ["parallelism=fsdp", *TINY, "train.global_batch_size=8", "train.micro_batch_size=2"],
    "fsdp-tiny-lora": ["parallelism=fsdp", "peft=lora", *TINY, "train.global_batch_size=8", "train.micro_batch_size=2"],
    "zero3-tiny": ["parallelism=zero3", *TINY, "train.global_batch_size=8", "train.micro_batch_size=2"],
    # the named unsharded-accumulation trade: every rank holds reduce-dtype gradients of ALL parameters
    "fsdp-tiny-unsharded": ["parallelism=fsdp", "parallelism.accumulate_unsharded=true", *TINY,
                            "train.global_batch_size=8", "train.micro_batch_size=2"],
    "fsdp-100M": ["parallelism=fsdp", *TINY, *M100, "train.global_batch_size=4", "train.micro_batch_size=1"],
    "zero3-100M": ["parallelism=zero3", *TINY, *M100, "train.global_batch_size=4", "train.micro_batch_size=1"],
}


@pytest.mark.slow
def test_state_bytes_equal_the_engines(tmp_path):
    """All cases in one 2-process group (one start-up); each builds its engine through sft.train/sft.parallel."""
    from test_distributed import torchrun

    args = [str(REPO / "tests"), str(tmp_path / "bytes")]
    for i, case in enumerate(CASES.values()):
        args += (["--"] if i else []) + case
    res = torchrun(args, script=str(REPO / "tests" / "workers" / "state_bytes.py"))
    assert res.returncode == 0, res.stderr[-4000:]
    for i, (name, case) in enumerate(CASES.items()):
        cfg = compose(case)
        accumulation = cfg.train.global_batch_size // (2 * cfg.train.micro_batch_size)
        for rank in (0, 1):
            measured = json.loads((tmp_path / f"bytes.{i}.rank{rank}.json").read_text())
            s = _predicted(case, 2, rank, accumulation)
            predicted = {"params": s.params, "grads": s.grads, "optimizer": s.optimizer, "buffers": s.buffers}
            if cfg.parallelism.accumulate_unsharded:
                # between micro-steps only the unsharded accumulators hold gradients (the sharded ones were
                # cleared by the step; both exist briefly at the reduce-scatter, which the plan counts)
                predicted = {"params": s.params, "grads": 0, "optimizer": s.optimizer, "buffers": s.buffers}
            if cfg.parallelism.strategy == "zero3":
                predicted.update(master=s.master, buffers=s.buffers)
            assert {k: measured[k] for k in predicted} == predicted, (name, rank)
        if "100M" in name:
            assert 95e6 < sum(p.numel for p in _arch(case).params) < 105e6


def _arch(overrides):
    from sft.memory import build_architecture

    return build_architecture(compose(overrides))


def _saved_bytes(module, ids, pos, labels) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(ids, pos, labels=labels)
    return sum(seen.values())


@pytest.mark.parametrize("backend,dtype,checkpointing", [
    ("sdpa", torch.float32, False), ("eager", torch.float32, False), ("sdpa", torch.bfloat16, False),
    ("sdpa", torch.float32, True), ("eager", torch.bfloat16, True),
])
def test_activation_estimate_within_25_percent_of_autograd(backend, dtype, checkpointing):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.activations import estimate
    from sft.loss import ChunkedLossLM

    hf = AutoConfig.for_model("llama", vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(hf, attn_implementation=backend, dtype=dtype)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    T = 512
    ids = torch.randint(0, 1000, (1, T), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(300), torch.arange(212)])[None]  # two packed documents
    measured = _saved_bytes(ChunkedLossLM(model, 4096), ids, pos, ids.clone())
    predicted = estimate(hf, compute_bytes=dtype.itemsize, backend=backend, rows=1, row_tokens=T,
                         checkpointing=checkpointing, packed=True).saved
    assert abs(predicted - measured) <= 0.25 * measured, (predicted, measured)


# Published per-GPU peaks (torchtune README "Memory and training speed", pytorch/torchtune@0031bfb, configs
# recipes/configs/llama3_1/70B_lora.yaml and 70B_full.yaml): batch size 2, packed to 2048 tokens, FSDP2 on
# 8 x A100 80GB, activation checkpointing, bf16 everywhere, torch.compile on.
#   70B LoRA (q, v, o and the MLP, rank 16)                     27.6 GiB
#   70B full fine-tuning, CPU offload, optimizer in backward    13.9 GiB
# Compared with the predicted bytes the allocator hands out (the plan's peak less its fragmentation, CUDA
# context and NCCL allowances, which torch's allocated counter does not include). Differences, explained:
# - torchtune keeps LoRA adapters and their AdamW state in bf16 (ours fp32: +0.2 GiB) and compiles the model
#   (fewer saved intermediates inside the recompute window); we stay 13% above its LoRA figure.
# - its offload recipe shards the embedding and the output layer as separate FSDP units
#   (custom_sharded_layers), so only one of them is gathered at a time and the output layer's gradient is
#   reduced as soon as it exists; ours gathers the root (both) for the whole step. The test replaces our
#   root terms by that layout, from our own itemised numbers, and reduces in bf16 as torchtune does.
# torchtitan's tables (docs/performance.md, benchmarks/llama3_h100_202412_torchtitan.md) give WPS/MFU, and
# memory only with Float8, selective op checkpointing and full-vocabulary logits: not comparable.
PUBLISHED = [
    (["model=llama3_70b", "parallelism=fsdp", "peft=lora", "peft.target_modules=[q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
      "parallelism.param_dtype=bfloat16", "parallelism.reduce_dtype=bfloat16", "parallelism.master_dtype=bfloat16",
      "model.activation_checkpointing=true"], 27.6, False),
    (["model=llama3_70b", "parallelism=fsdp_offload", "parallelism.param_dtype=bfloat16", "parallelism.reduce_dtype=bfloat16",
      "model.activation_checkpointing=true"], 13.9, True),
]


@pytest.mark.parametrize("overrides,published_gib,separate_root_units", PUBLISHED,
                         ids=["torchtune-70B-lora", "torchtune-70B-full-offload"])
def test_published_references_within_15_percent(overrides, published_gib, separate_root_units):
    from sft.memory import GiB, build_architecture, plan_memory

    cfg = compose(["data.path=/nonexistent.jsonl", "data=jsonl", "train.micro_batch_size=2", "data.max_length=2048",
                   "train.global_batch_size=16", "model.attn_implementation=sdpa", "packing=off", *overrides])
    arch = build_architecture(cfg)
    mp = plan_memory(cfg, 8, 80 * GiB, arch)
    allocated = {k: v for k, v in mp.items.items() if not k.startswith(("allocator", "CUDA", "NCCL"))}
    if separate_root_units:
        allocated.pop("gathered root (embeddings, norm, output layer)")
        allocated.pop("output layer gradients until the root's reduce-scatter")
        allocated["one of embedding / output layer gathered"] = max(p.numel for p in arch.params if p.layer < 0) * 2
    predicted = sum(allocated.values()) / GiB
    assert abs(predicted - published_gib) <= 0.15 * published_gib, (predicted, allocated)


def _plan(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "sft.plan", *args, f"plan.out={tmp_path / 'plan.json'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_fits_on_the_demo_and_renders_examples(tmp_path):
    res = _plan(["cluster.nodes=1", "cluster.gpus_per_node=1"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "plan.json").read_text())
    for key in ("fits", "memory_per_gpu_gb", "memory", "host_memory_gb", "checkpoint_gb", "flops_per_token", "hours_per_epoch"):
        assert key in report
    assert report["fits"] and report["hours_per_epoch"] is not None and not report["refusals"]
    assert "[[" in res.stdout and "]]" in res.stdout  # trained tokens marked (not a tty)
    assert report["memory_per_gpu_gb"] == pytest.approx(sum(report["memory"].values()), abs=0.05)


@pytest.mark.slow
def test_cli_does_not_fit_reports_everything_then_fails(tmp_path):
    # Llama-3-70B, full fine-tuning, one node of 80 GB GPUs: 8.8e9 parameters' fp32 state per GPU does not fit.
    res = _plan(["experiment=llama3_70b_full", "data.path=/nonexistent.jsonl", "cluster.nodes=1"], tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    report = json.loads((tmp_path / "plan.json").read_text())
    assert not report["fits"] and report["memory_per_gpu_gb"] > 80
    assert "cluster.nodes=" in report["cheapest_fix"]
    assert "does NOT fit" in res.stdout and "checkpoint:" in res.stdout and "FLOPs per token" in res.stdout


def test_cli_refuses_what_train_refuses(tmp_path):
    from sft import config as C
    from sft.errors import SFTError

    args = ["train.global_batch_size=6", "train.micro_batch_size=4", "cluster.nodes=1", "cluster.gpus_per_node=1"]
    with pytest.raises(SFTError) as train_refusal:
        C.validate(compose(args), 1)
    res = _plan(args, tmp_path)
    assert res.returncode == 2
    assert str(train_refusal.value) in res.stderr


def test_check_memory_fits_refuses_with_the_skip_hint():
    from sft.errors import SFTError
    from sft.memory import GiB
    from sft.plan import check_memory_fits

    # model.path=null: the architecture from model.arch (no Hub here; training would fetch config.json)
    cfg = compose(["experiment=llama3_70b_full", "data.path=/nonexistent.jsonl", "model.path=null"])
    with pytest.raises(SFTError, match="train.skip_memory_check=true"):
        check_memory_fits(cfg, 8, 80 * GiB)
    check_memory_fits(cfg, 64, 80 * GiB)  # the recipe's 8 nodes fit
    cfg.train.skip_memory_check = True
    check_memory_fits(cfg, 8, 80 * GiB)


def test_mask_refusals_on_real_templates(tokenizer):
    """A prompt-training mask, an untrained end-of-turn and an empty mask are each refused."""
    import numpy as np
    from datasets import Dataset

    from sft.data import Split
    from sft.plan_data import mask_refusals
    from sft.templating import IGNORE_INDEX

    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [5, 6, 7, eot, 8, 9, eot]
    good = [IGNORE_INDEX] * 4 + [8, 9, eot]
    rows = {"input_ids": [ids] * 4, "labels": [good, ids, [IGNORE_INDEX] * 7, good[:-1] + [IGNORE_INDEX]],
            "num_tokens": [7] * 4}
    refusals = mask_refusals(Split(Dataset.from_dict(rows)), eot, tokenizer.pad_token_id, tokenizer.eos_token_id, raw_text=False)
    text = " ".join(refusals)
    assert "empty assistant mask" in text and "end-of-turn" in text and "prompt" in text
    assert mask_refusals(Split(Dataset.from_dict({k: v[:1] for k, v in rows.items()})), eot, tokenizer.pad_token_id,
                         tokenizer.eos_token_id, raw_text=False) == []
    assert np.all(np.asarray(good) != 0)


@pytest.mark.slow
def test_slurm_script_stops_a_run_that_cannot_fit_before_srun(tmp_path):
    """slurm/sft_70b.sh on 1 node: the preflight refuses Llama-3-70B full fine-tuning on 8 GPUs, srun never runs."""
    from test_slurm import slurm_env

    env = slurm_env(tmp_path, job_id=4343, nodes=1, nodelist="gpu-001", SFT_GPUS_PER_NODE=8, HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", str(REPO / "slurm" / "sft_70b.sh"), "data.path=/nonexistent.jsonl"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "does NOT fit" in proc.stdout and "cluster.nodes=" in proc.stdout
    assert json.loads((tmp_path / "plan-4343.json").read_text())["fits"] is False
    log = tmp_path / "stub.log"
    assert not log.exists() or "srun" not in log.read_text()
