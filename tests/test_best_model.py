"""final/ is the best model when early stopping or eval.keep_best is on; its checkpoint is never pruned;
summary.json says what happened. A high learning rate makes the eval loss worsen after a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_RUN, REPO, run_cli
from sft.export import _dcp_tensors, _zero3_tensors

UNSTABLE = [*FAST_RUN, "optim.lr=0.05", "eval.every=1", "train.max_steps=12", "checkpoint.every=1", "checkpoint.keep=1"]


def _final_weights(run):
    final = run / "final"
    index = final / "model.safetensors.index.json"
    if not index.exists():
        return load_file(final / "model.safetensors")
    out = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(final / shard))
    return out


def _checkpoint_weights(run, step: int):
    path = run / "checkpoints" / f"step-{step:06d}"
    return dict(_zero3_tensors(path) if (path / "zero3").is_dir() else _dcp_tensors(path))


def _evals(run) -> list[tuple[int, float]]:
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["eval_loss"]) for e in events if "eval_loss" in e]


def _check_best_run(run, patience: int):
    summary = json.loads((run / "summary.json").read_text())
    evals = _evals(run)
    best_step, best_loss = min(evals, key=lambda e: e[1])
    last_step, last_loss = evals[-1]
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == last_step
    assert last_step == best_step + patience  # stopped after `patience` evaluations without a new best
    assert (summary["best_eval_step"], summary["final_step"], summary["final_is"]) == (best_step, best_step, "best")
    assert summary["best_eval_loss"] == pytest.approx(best_loss) and summary["last_eval_loss"] == pytest.approx(last_loss)
    assert last_loss > best_loss
    # checkpoint.keep=1 keeps the newest checkpoint, and the best one beside it.
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == [f"step-{best_step:06d}", f"step-{last_step:06d}"]
    final, best, last = _final_weights(run), _checkpoint_weights(run, best_step), _checkpoint_weights(run, last_step)
    assert final.keys() == best.keys()
    for k in final:
        assert torch.equal(final[k], best[k]), k
    assert any(not torch.equal(final[k], last[k]) for k in final)  # ...and the last model differs


def test_early_stopping_exports_the_best_checkpoint(tmp_path):
    run = tmp_path / "es"
    res = run_cli([*UNSTABLE, f"run.output_dir={run}", "eval.early_stopping_patience=2"])
    assert res.returncode == 0, res.stderr[-3000:]
    _check_best_run(run, patience=2)
    assert "final/ holds the best model: step" in res.stdout + res.stderr


def test_keep_best_without_early_stopping(tmp_path):
    run = tmp_path / "kb"
    res = run_cli([*UNSTABLE, f"run.output_dir={run}", "train.max_steps=4", "eval.keep_best=true", "checkpoint.every=0"])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    evals = _evals(run)
    best_step = min(evals, key=lambda e: e[1])[0]
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 4
    assert summary["final_step"] == best_step < 4, (summary, evals)  # the lr=0.05 run is best at step 2
    assert summary["last_eval_loss"] == pytest.approx(evals[-1][1]) and summary["final_is"] == "best"
    final, best = _final_weights(run), _checkpoint_weights(run, best_step)
    assert all(torch.equal(final[k], best[k]) for k in final)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_early_stopping_with_sharded_engines_exports_the_best_checkpoint(tmp_path, strategy):
    run = tmp_path / strategy
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sft.train",
           *UNSTABLE, f"parallelism={strategy}", "train.micro_batch_size=2", f"run.output_dir={run}", "eval.early_stopping_patience=2"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    _check_best_run(run, patience=2)
