"""DeepSpeed ZeRO-3: the engine, and its JSON generated from the Hydra config (never hand-kept beside it)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from sft.loader import MicroBatch
from sft.optim import OptimConfig, build_optimizer, build_scheduler, param_groups

log = logging.getLogger(__name__)
CHECKPOINT_TAG = "zero3"


def deepspeed_config(par, optim_cfg: OptimConfig, micro_rows: int, accumulation: int, world: int) -> dict:
    """The whole DeepSpeed config, derived: batch sizes from train.*, precision and offload from parallelism.*."""
    zero = {
        "stage": 3,
        "overlap_comm": torch.cuda.is_available(),
        "contiguous_gradients": True,
        "reduce_bucket_size": par.zero3_bucket_size,
        "stage3_prefetch_bucket_size": par.zero3_bucket_size,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if par.cpu_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_rows,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_rows * accumulation * world,
        # DeepSpeed clips at 1.0 unless told otherwise: always state it.
        "gradient_clipping": float(optim_cfg.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": par.param_dtype == "bfloat16"},
        "fp16": {"enabled": par.param_dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if par.cpu_offload:
        # Offloaded optimizer state needs DeepSpeed's CPU Adam; it is named here so DeepSpeed builds it.
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": optim_cfg.lr, "betas": [optim_cfg.beta1, optim_cfg.beta2], "eps": optim_cfg.eps,
            "weight_decay": optim_cfg.weight_decay}}
    return cfg


@contextlib.contextmanager
def zero_init_scope(par, optim_cfg: OptimConfig, total_steps: int, device, world: int, micro_rows: int, accumulation: int):
    """While open, transformers builds and loads models partitioned (deepspeed.zero.Init): no rank holds a full copy.

    Closed right after the model is built: a live HfDeepSpeedConfig would put every later model
    construction under zero.Init too, and one built on rank 0 alone would then hang.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import deepspeed

    # DeepSpeed's config reads the world size from its own comm layer: attach it to our process group first.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False)
    keep = HfDeepSpeedConfig(deepspeed_config(par, optim_cfg, micro_rows, accumulation, world))
    try:
        yield keep
    finally:
        unset_hf_deepspeed_config()


class ZeroEngine:
    def __init__(self, module: nn.Module, par, optim_cfg: OptimConfig, total_steps: int, device, world: int,
                 micro_rows: int, accumulation: int):
        import deepspeed

        self.ds_config = deepspeed_config(par, optim_cfg, micro_rows, accumulation, world)
        self.world = world
        self.accumulation = accumulation
        self.device = device
        if par.cpu_offload:
            optimizer, params = None, param_groups(module, optim_cfg.weight_decay)
            scheduler = lambda opt: build_scheduler(opt, optim_cfg, total_steps)  # noqa: E731
        else:
            optimizer, params = build_optimizer(module, optim_cfg), None
            scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler, config=self.ds_config)
        self.module = module  # DeepSpeed's hooks gather parameters for any forward through it
        self._grad_norm = 0.0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def forward_backward(self, mb: MicroBatch, scale: float, last_micro: bool) -> float:
        inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in mb.model_inputs().items()}
        loss_sum = self.ds(labels=mb.labels.to(self.device), **inputs)
        # DeepSpeed divides by the accumulation steps and averages over ranks; undo both.
        self.ds.backward(loss_sum * (scale * self.world * self.accumulation))
        self.ds.step()  # applies the update (clip, optimizer, scheduler) only at the accumulation boundary
        return float(loss_sum.detach())

    def clip_and_step(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def module_for_export(self) -> nn.Module:
        return self.module.model

    def iter_full_tensors(self, trainable_only: bool = False):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        from sft import distributed as D

        for name, p in self.module.model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            with GatheredParameters([p], modifier_rank=None):  # one tensor at a time: no full copy on any rank
                yield name, (p.data.detach().cpu().clone() if D.rank() == 0 else None)

    def save_state(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_state(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            from sft.errors import SFTError

            raise SFTError(f"{directory}: no DeepSpeed ZeRO-3 state in this checkpoint (was it written by another backend?)")
