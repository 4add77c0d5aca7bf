"""DeepSpeed ZeRO-3: the engine, and its JSON generated from the Hydra config (never hand-kept beside it)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from sft.errors import SFTError
from sft.loader import MicroBatch
from sft.optim import build_optimizer, build_scheduler, param_groups
from sft.parallel import EngineSpec, Precision, TrainEngine, export_dtype, to_device

log = logging.getLogger(__name__)
CHECKPOINT_TAG = "zero3"
_DS_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def deepspeed_config(spec: EngineSpec, precision: Precision) -> dict:
    """The whole DeepSpeed config, derived: batch sizes from train.*, precision and offload from parallelism.*.

    bf16 compute keeps fp32 master weights and AdamW moments in DeepSpeed's optimizer (its bf16 mode);
    gradients are reduced and accumulated in parallelism.reduce_dtype.
    """
    par, optim_cfg = spec.parallel, spec.optim
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
        "train_micro_batch_size_per_gpu": spec.micro_rows,
        "gradient_accumulation_steps": spec.accumulation,
        "train_batch_size": spec.micro_rows * spec.accumulation * spec.world,
        # DeepSpeed clips at 1.0 unless told otherwise: always state it.
        "gradient_clipping": float(optim_cfg.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision.compute == torch.bfloat16},
        "communication_data_type": _DS_DTYPE[precision.reduce],
        "data_types": {"grad_accum_dtype": _DS_DTYPE[precision.reduce]},
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
def zero_init_scope(spec: EngineSpec, precision: Precision):
    """While open, transformers builds and loads models partitioned (deepspeed.zero.Init): no rank holds a full copy.

    Closed right after the model is built: a live HfDeepSpeedConfig would put every later model
    construction under zero.Init too, and one built on rank 0 alone would then hang.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import deepspeed

    # DeepSpeed's config reads the world size from its own comm layer: attach it to our process group first.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False)
    keep = HfDeepSpeedConfig(deepspeed_config(spec, precision))
    try:
        yield keep
    finally:
        unset_hf_deepspeed_config()


class ZeroEngine(TrainEngine):
    def __init__(self, module: nn.Module, spec: EngineSpec, precision: Precision, device):
        import deepspeed

        optim_cfg = spec.optim
        self.ds_config = deepspeed_config(spec, precision)
        self.world = spec.world
        self.accumulation = spec.accumulation
        self.device = device
        self.precision = precision
        if spec.parallel.cpu_offload:
            optimizer, params = None, param_groups(module, optim_cfg.weight_decay)
            scheduler = lambda opt: build_scheduler(opt, optim_cfg, spec.total_steps)  # noqa: E731
        else:
            optimizer, params = build_optimizer(module, optim_cfg, device), None
            scheduler = build_scheduler(optimizer, optim_cfg, spec.total_steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler, config=self.ds_config)
        self.module = module  # DeepSpeed's hooks gather parameters for any forward through it

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def forward_backward(self, mb: MicroBatch, scale: float, last_micro: bool, num_chunks: int | None = None) -> torch.Tensor:
        loss_sum = self.ds(**to_device(mb, self.device), num_chunks=num_chunks)
        # DeepSpeed divides by the accumulation steps and averages over ranks; undo both.
        self.ds.backward(loss_sum * (scale * self.world * self.accumulation))
        if not last_micro:
            self.ds.step()  # DeepSpeed counts micro-steps in step(); before the boundary it updates nothing
        return loss_sum.detach()

    def clip_and_step(self) -> torch.Tensor:
        """At the accumulation boundary DeepSpeed's step clips (gradient_clipping), updates and steps the schedule."""
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else float("nan"))

    def release_optimizer(self) -> None:
        """DeepSpeed owns its flat buffers (and they are partitioned: 1/world of the state per rank)."""

    def iter_full_tensors(self, trainable_only: bool = False):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        from sft import distributed as D

        for name, p in self.module.model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            with GatheredParameters([p], modifier_rank=None):  # one tensor at a time: no full copy on any rank
                yield name, (export_dtype(p.data.detach().cpu(), self.precision, trainable_only).clone() if D.rank() == 0 else None)

    def save_state(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_state(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise SFTError(f"{directory}: no DeepSpeed ZeRO-3 state in this checkpoint (was it written by another backend?)")
