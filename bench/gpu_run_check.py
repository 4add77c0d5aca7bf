"""The user's own path on a GPU: `sft.train` through Hydra, as a user starts it, not the engines alone.

    python bench/gpu_run_check.py --out DIR          # on one GPU, ~2 minutes
    python bench/gpu_run_check.py --out DIR --cpu    # the rehearsal (gloo, fp32 demo; the CUDA-only row is skipped)

bench/gpu_check.py measures the engines; this runs the command line end to end on the device:
  demo              `python -m sft.train` alone (the embedded demo): exit 0, final/ written, the demo score
  bf16_fsdp         torchrun, parallelism=fsdp, model.dtype=bfloat16: 6 steps, checkpoints at 3 and 6, eval, export
  resume            the step-3 checkpoint resumed to step 6: final weights against the straight run
  preflight_70b     model=llama3_70b, full fine-tuning on this one GPU: refused at start-up by the memory plan,
                    exit 2, before any model or tokenizer is loaded (CUDA only: the check reads the GPU's memory)
Needs hydra-core, omegaconf and antlr4 (carried as wheels to the lent machine); reads nothing from the network.
Writes gpu_run_check.md and gpu_run_check.log to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = ["model=tiny", "data.eval_max=16", "eval.generate=0", "run.demo=false", "train.global_batch_size=8",
            "train.micro_batch_size=4", "optim.warmup_steps=2", "train.max_steps=6", "checkpoint.every=3",
            "checkpoint.keep=5", "eval.every=3"]


class Runner:
    def __init__(self, out: Path):
        self.rows: list[dict] = []
        self.log = (out / "gpu_run_check.log").open("w")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")

    def sft(self, args: list[str], torchrun: bool = False, timeout: int = 240) -> tuple[int, str, float]:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun
                    else [sys.executable])
        cmd = [*launcher, "-m", "sft.train", *args]
        t = time.monotonic()
        try:
            res = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
            rc, err = res.returncode, res.stderr
        except subprocess.TimeoutExpired as exc:
            rc, err = 124, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
        took = time.monotonic() - t
        self.log.write(f"$ {' '.join(cmd)}\nrc={rc} {took:.1f}s\n{err[-6000:]}\n\n")
        self.log.flush()
        return rc, err, took

    def add(self, name: str, ok, value, detail: str) -> None:
        self.rows.append({"name": name, "pass": ok, "value": value, "detail": detail})
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{status}  {name:<28} {value!s:>12}  {detail}", flush=True)


def losses(run: Path) -> list[float]:
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [e["loss"] for e in events if "loss" in e]


def last_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip() and "Warning" not in x]
    return lines[-1][:300] if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("gpu_run_check"))
    ap.add_argument("--cpu", action="store_true", help="the rehearsal on a machine without a GPU")
    args = ap.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device; --cpu for the rehearsal", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    r = Runner(args.out)
    work = Path(tempfile.mkdtemp(prefix="gpu_run_check-"))
    dtype = "float32" if args.cpu else "bfloat16"

    # 1. the embedded demo, exactly as the README's first command
    rc, err, took = r.sft([f"run.output_dir={work / 'demo'}"])
    summary = work / "demo" / "summary.json"
    score = json.loads(summary.read_text()).get("demo_exact_match_after") if summary.exists() else None
    r.add("demo", rc == 0 and (work / "demo" / "final" / "config.json").exists(), score,
          f"python -m sft.train: exit {rc} in {took:.0f} s; demo exact match after training {score}; " + last_line(err)[:120])

    # 2. a bf16 FSDP2 run through torchrun, with checkpoints, eval and export
    straight = work / "straight"
    common = [*TINY_RUN, f"model.dtype={dtype}", "parallelism=fsdp"]
    rc, err, took = r.sft([*common, f"run.output_dir={straight}"], torchrun=True)
    ok = rc == 0 and (straight / "final" / "model.safetensors").exists()
    curve = losses(straight) if (straight / "metrics.jsonl").exists() else []
    r.add("bf16_fsdp", ok and len(curve) == 6 and all(x == x for x in curve) and curve[-1] < curve[0],
          round(curve[-1], 4) if curve else None,
          f"torchrun 1 GPU, fsdp, model.dtype={dtype}: exit {rc} in {took:.0f} s; losses "
          + " ".join(f"{x:.4f}" for x in curve) + ("" if ok else " | " + last_line(err)))

    # 3. resume the step-3 checkpoint to step 6: the same final weights as the straight run
    resumed = work / "resumed"
    if (straight / "checkpoints" / "step-000003").exists():
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(straight / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
        (resumed / "checkpoints" / "LATEST").write_text("step-000003\n")
        rc, err, took = r.sft([*common, f"run.output_dir={resumed}"], torchrun=True)
        if rc == 0 and (resumed / "final" / "model.safetensors").exists():
            from safetensors.torch import load_file

            a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
            worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            equal = all(torch.equal(a[k], b[k]) for k in a)
            tail = losses(resumed)
            r.add("resume", worst <= 1e-2, worst,
                  f"max |w_resumed - w_straight| over final/ ({'bitwise equal' if equal else 'not bitwise equal'}); "
                  f"losses after resume {' '.join(f'{x:.4f}' for x in tail)} vs straight "
                  f"{' '.join(f'{x:.4f}' for x in curve[3:])}")
        else:
            r.add("resume", False, None, f"exit {rc}: {last_line(err)}")
    else:
        r.add("resume", False, None, "no step-3 checkpoint from the straight run")

    # 4. a run that cannot fit is refused before anything is loaded
    if args.cpu:
        r.add("preflight_70b", None, None, "skipped: the start-up memory check reads the GPU's memory")
    else:
        # A local config.json of the 70B shape (the conf's stand-in values): the lent machine has no network and
        # the check needs only the config; sdpa because flash-attn is not installed there.
        from transformers import AutoConfig
        from omegaconf import OmegaConf

        arch = dict(OmegaConf.load(REPO / "conf/model/llama3_70b.yaml").arch)
        AutoConfig.for_model("llama", **arch).save_pretrained(work / "llama3_70b_config")
        rc, err, took = r.sft(["model=llama3_70b", f"model.path={work / 'llama3_70b_config'}", "model.attn_implementation=sdpa",
                               "data=jsonl", f"data.path={REPO / 'sft/assets/demo/conversations.jsonl'}", "parallelism=fsdp",
                               f"run.output_dir={work / 'big'}"], torchrun=True, timeout=180)
        # torchrun reports a failed worker as exit 1 and adds its own traceback: read the worker's "error:" line.
        line = next((x for x in err.splitlines() if x.startswith("error:")), last_line(err))[:400]
        refused = rc in (1, 2) and "more than the" in line and not (work / "big").exists()
        r.add("preflight_70b", refused, rc, f"{took:.0f} s, run directory {'not ' if not (work / 'big').exists() else ''}created: {line}")

    failed = [x["name"] for x in r.rows if x["pass"] is False]
    md = ["| check | pass | value | detail |", "| --- | --- | --- | --- |"]
    md += [f"| {x['name']} | {'skip' if x['pass'] is None else ('yes' if x['pass'] else 'NO')} | {x['value']} | "
           f"{x['detail'].replace('|', '/')} |" for x in r.rows]
    (args.out / "gpu_run_check.md").write_text("\n".join(md) + "\n")
    print(f"gpu_run_check: {len(r.rows)} checks, {len(failed)} failed {failed}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
