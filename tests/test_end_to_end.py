"""The CLI on tiny runs: the run directory contract, resume == uninterrupted, export == trained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_RUN, compose, run_cli
from sft.checkpoint import latest_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    res = run_cli([*FAST_RUN, f"run.output_dir={out}", "train.max_steps=6", "checkpoint.every=3", "checkpoint.keep=5",
                   "eval.every=3"])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_run_directory_contract(straight_run):
    run = straight_run
    for name in ("config.yaml", "metrics.jsonl", "report.png", "summary.json", "checkpoints/LATEST", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "final/generation_config.json", "logs/rank0.log"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-000006"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step-000003", "step-000006"]
    state = json.loads((run / "checkpoints" / "step-000006" / "train_state.json").read_text())
    assert state["step"] == 6 and state["tokens"] > 0
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens", "target_tokens", "tokens_per_s", "mem_gb"):
        assert all(key in e for e in steps), key
    assert [e["step"] for e in events if "eval_loss" in e] == [3, 6]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert not list(run.glob(".*")), "no temporary files left behind"


def test_resume_equals_uninterrupted(straight_run, tmp_path):
    """Resume from the step-3 checkpoint and finish: the same final weights as the straight run, bit for bit."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    shutil.copytree(straight_run / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
    (resumed / "checkpoints" / "LATEST").write_text("step-000003\n")
    res = run_cli([*FAST_RUN, f"run.output_dir={resumed}", "train.max_steps=6", "checkpoint.every=3", "eval.every=3"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    a = load_file(straight_run / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exported_model_equals_trained_model(straight_run):
    """final/ loaded by transformers gives the logits of the trained weights restored from the last checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.train import build_training, prepare

    cfg = compose([*FAST_RUN, f"run.output_dir={straight_run}", "train.max_steps=6"])
    s = prepare(cfg)
    engine = build_training(s)
    load_checkpoint(latest_checkpoint(straight_run), engine)
    exported = AutoModelForCausalLM.from_pretrained(straight_run / "final")
    tok = AutoTokenizer.from_pretrained(straight_run / "final")
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    ids = torch.randint(3, len(tok), (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = engine.module.lm(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_lora_run_exports_adapter_and_merges(tmp_path):
    from transformers import AutoModelForCausalLM

    from sft.train import build_training, prepare

    out = tmp_path / "lora"
    args = [*FAST_RUN, f"run.output_dir={out}", "train.max_steps=3", "peft=lora", "peft.r=4", "optim.lr=1e-2"]
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    final = out / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    # Checkpoints hold the adapter (and its optimizer state) only, never the frozen base weights.
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(latest_checkpoint(out))).read_metadata().state_dict_metadata.keys()
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys[:5]
    res = run_cli([str(out)], module="sft.export")
    assert res.returncode == 0, res.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(out / "final-merged")
    s = prepare(compose(args))
    engine = build_training(s)
    load_checkpoint(latest_checkpoint(out), engine)
    ids = torch.randint(3, 260, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, engine.module.lm(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_wandb_offline_without_key_and_secrets_stay_out(tmp_path):
    out = tmp_path / "wb"
    secret = "sk-test-0123456789abcdef"
    res = run_cli([*FAST_RUN, f"run.output_dir={out}", "train.max_steps=2", "logging=wandb"],
                  env_extra={"WANDB_MODE": "offline", "HF_TOKEN": secret, "WANDB_API_KEY": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    assert list((out / "wandb").glob("offline-run-*")), "wandb logged offline into the run directory"
    for f in out.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in res.stdout + res.stderr


def test_demo_score_rises(tmp_path):
    """The embedded demo, shortened: exact match on held-out prompts is higher after training than before."""
    out = tmp_path / "demo"
    res = run_cli([f"run.output_dir={out}", "train.max_steps=80", "eval.every=0", "eval.score_prompts=34", "checkpoint.every=0"])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["demo_exact_match_before"] == 0.0
    assert summary["demo_exact_match_after"] >= 0.1, summary  # 17.6% measured at 80 steps; ~92% at the full 150
    assert "demo exact match after training" in res.stdout + res.stderr
