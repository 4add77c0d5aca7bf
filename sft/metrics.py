"""Where a run's numbers go: metrics.jsonl (every rank-0 event), a console progress bar, wandb, report.png."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
# Never written to config.yaml, logs or wandb: credentials reach wandb through its own environment lookup.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass
class LoggingConfig:
    progress_bar: bool = True
    wandb: bool = False
    wandb_project: str = "sft"
    wandb_entity: Optional[str] = None
    wandb_mode: str = "${oc.env:WANDB_MODE,online}"  # online | offline | disabled; offline needs no key


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, total_steps: int, is_main: bool, flat_config: dict, run_name: str):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.events: list[dict] = []
        self.bar = None
        self.wandb = None
        if not is_main:
            return
        if self.path.exists():  # a resumed run appends after what it already logged
            self.events = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, unit="step")
        if cfg.wandb and cfg.wandb_mode != "disabled":
            import wandb

            mode = cfg.wandb_mode
            if mode == "online" and not os.environ.get("WANDB_API_KEY"):
                log.warning("logging.wandb: no WANDB_API_KEY in the environment; logging offline (wandb sync later)")
                mode = "offline"
            self.wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_name, mode=mode,
                                    dir=str(run_dir), config=flat_config, resume="allow", id=_wandb_id(run_dir))

    def set_position(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, event: dict) -> None:
        if not self.is_main:
            return
        event = {k: v for k, v in event.items() if v is not None}
        self.events.append(event)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(event) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in event.items() if isinstance(v, (int, float))}, step=event.get("step"))
        if self.bar is not None and "loss" in event:
            self.bar.n = event["step"]
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}", tok_s=f"{event['tokens_per_s']:.0f}")
        elif "eval_loss" in event:
            self.write(f"step {event['step']}: eval_loss {event['eval_loss']:.4f}" +
                       (f", exact match {event['exact_match']:.1%}" if "exact_match" in event else ""))

    def write(self, line: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


class Throughput:
    """Tokens/s and MFU over all steps since the last log event, whatever train.log_every is.

    MFU per GPU = tokens/s per GPU x FLOPs per token / peak FLOPs of one GPU, with FLOPs from
    sft.flops (the same formula sft-plan uses), so every backend and world size reports the same
    figure for the same work. Only the time from `start_step()` to `add()` counts, so evaluation
    and checkpoint writes between steps do not lower the figure; a log step reads the loss, which
    waits for the device, so the queued work of the logged steps is inside the measured time.
    """

    def __init__(self, flops, world: int, peak_flops_per_gpu: float):
        self.flops = flops
        self.world = world
        self.peak = peak_flops_per_gpu
        self.restart()

    def restart(self) -> None:
        self.seconds = 0.0
        self.tokens = 0.0
        self.model_flops = 0.0
        self.started = None

    def start_step(self) -> None:
        self.started = time.perf_counter()

    def add(self, tokens: float, attention_pairs: float) -> None:
        self.seconds += time.perf_counter() - (self.started or time.perf_counter())
        self.started = None
        self.tokens += tokens
        self.model_flops += self.flops.step_flops(tokens, attention_pairs)

    def read(self) -> dict:
        """Figures since the last read, including the device time of reading the loss just before this call."""
        from sft.flops import mfu

        dt = max(self.seconds, 1e-9)
        out = {"tokens_per_s": self.tokens / dt, "tokens_per_s_per_gpu": self.tokens / dt / self.world, "mem_gb": peak_memory_gb()}
        if self.peak > 0:
            out["mfu"] = mfu(self.model_flops, dt, self.world, self.peak)
        self.restart()
        return out


def peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_report(run_dir: Path, events: list[dict], summary: dict) -> None:
    """report.png (train and eval loss against tokens) and summary.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["tokens"], e["loss"]) for e in events if "loss" in e and "tokens" in e]
    evals = [(e["tokens"], e["eval_loss"]) for e in events if "eval_loss" in e and "tokens" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (per target token)")
    ax.set_title(summary.get("run_name", ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "report.png", dpi=100)
    plt.close(fig)
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))


def format_summary(summary: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if not math.isnan(v) else "n/a"
        return str(v)

    width = max(len(k) for k in summary)
    return "\n".join(f"  {k.ljust(width)}  {fmt(v)}" for k, v in summary.items())
