"""AdamW with decay only on matrices, and a warmup + decay learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sft.errors import SFTError


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    # Warmup as a share of the run's steps (used when larger than warmup_steps): a fixed count never reaches
    # the peak learning rate on a small dataset, and is a rounding error on a large one.
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio


def validate_optim_config(cfg: OptimConfig) -> None:
    if cfg.name != "adamw":
        raise SFTError(f"optim.name={cfg.name!r}: only adamw is available")
    if cfg.lr <= 0:
        raise SFTError(f"optim.lr={cfg.lr} must be positive")
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise SFTError(f"optim.schedule={cfg.schedule!r}: expected cosine, linear or constant")
    if cfg.warmup_steps < 0 or cfg.grad_clip < 0:
        raise SFTError("optim.warmup_steps and optim.grad_clip must be >= 0")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise SFTError(f"optim.warmup_ratio={cfg.warmup_ratio} must be in [0, 1)")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Norm weights and biases (1-D tensors) are not decayed: shrinking them only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """Fused AdamW on CUDA (one kernel for all parameters, DTensor shards included); on CPU the per-tensor
    loop, because the foreach kernels reject DTensor parameters of mixed placements on gloo."""
    on_cuda = torch.device(device).type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True if on_cuda else None, foreach=False if not on_cuda else None)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return max(cfg.warmup_steps, math.ceil(cfg.warmup_ratio * total_steps))


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The factor on optim.lr for optimizer step `step` (0-based)."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg, total_steps))
