"""The only module that distributes the model: single process, DDP, torch FSDP2 or DeepSpeed ZeRO-3.

Every engine takes the loss-summing module and exposes the same three operations to the loop:
`forward_backward(micro_batch, scale)`, `step()` and the state for checkpoints. Gradients are
always d(sum of token losses / global target tokens): the data-parallel averaging that DDP,
FSDP and DeepSpeed apply is undone by scaling the loss by the world size, so the update does
not depend on how many processes share the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from sft import distributed as D
from sft.errors import SFTError
from sft.loader import MicroBatch
from sft.optim import OptimConfig, build_optimizer, build_scheduler

log = logging.getLogger(__name__)
STRATEGIES = ("single", "ddp", "fsdp", "zero3")


def _dcp_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


@dataclass
class ParallelConfig:
    strategy: str = "single"  # single | ddp | fsdp | zero3
    param_dtype: str = "float32"  # compute dtype of sharded parameters (bfloat16 on GPUs)
    reduce_dtype: str = "float32"  # dtype of gradient reduction
    cpu_offload: bool = False  # parameters, gradients and optimizer state in host memory
    reshard_after_forward: bool = True  # FSDP2: free gathered layers after forward (ZeRO-3 behaviour)
    zero3_bucket_size: int = 50_000_000  # DeepSpeed reduce/prefetch bucket sizes, in elements


def validate_parallel_config(cfg: ParallelConfig, world: int) -> None:
    if cfg.strategy not in STRATEGIES:
        raise SFTError(f"parallelism.strategy={cfg.strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if cfg.strategy == "single" and world > 1:
        raise SFTError(
            f"parallelism=single but the launcher started {world} processes; "
            "choose parallelism=ddp, fsdp or zero3, or launch one process"
        )
    if cfg.cpu_offload and cfg.strategy not in ("fsdp", "zero3"):
        raise SFTError("parallelism.cpu_offload needs parallelism=fsdp or zero3")
    _check_launcher_agrees(cfg.strategy)


# What `accelerate launch` exports when its config asks for an engine. The Hydra config is the one
# source of truth; a launcher asking for something else is a mistake to report, not to guess about.
_LAUNCHER_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "zero3", "ACCELERATE_USE_FSDP": "fsdp"}


def _check_launcher_agrees(strategy: str) -> None:
    import os

    for var, wanted in _LAUNCHER_ENGINES.items():
        if os.environ.get(var, "").lower() in ("1", "true", "yes") and strategy != wanted:
            raise SFTError(
                f"the launcher environment sets {var}=true (an accelerate config asking for {wanted}) but the config says "
                f"parallelism={strategy}; launch with a topology-only accelerate config (launch/accelerate/) or set parallelism={wanted}"
            )


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class Engine:
    """Single process and DDP."""

    def __init__(self, module: nn.Module, optim_cfg: OptimConfig, total_steps: int, device, world: int, ddp: bool):
        self.module = module.to(device)
        self.device = device
        self.world = world
        self.optim_cfg = optim_cfg
        self.wrapped = module
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = build_optimizer(self.module, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)

    def _sync_context(self, last_micro: bool):
        import contextlib

        if hasattr(self.wrapped, "no_sync") and not last_micro:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def forward_backward(self, mb: MicroBatch, scale: float, last_micro: bool) -> float:
        with self._sync_context(last_micro):
            loss_sum = self.wrapped(**_to(mb, self.device))
            (loss_sum * (scale * self.world)).backward()
        return float(loss_sum.detach())

    def clip_and_step(self) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def module_for_export(self) -> nn.Module:
        """The LM (or its PEFT wrapper) whose keys iter_full_tensors() uses."""
        return self.module.model

    def iter_full_tensors(self, trainable_only: bool = False):
        """(name, full CPU tensor) keyed like module_for_export(), one tensor at a time; rank 0 gets the
        tensors, other ranks None. Every rank must consume the whole iterator (sharded engines gather)."""
        trainable = {n for n, p in self.module.model.named_parameters() if p.requires_grad}
        for name, value in self.module.model.state_dict().items():
            if trainable_only and name not in trainable:
                continue
            if hasattr(value, "full_tensor"):  # an FSDP2 shard: all-gather this one tensor only
                value = value.full_tensor()
            yield name, (value.detach().cpu().clone() if D.rank() == 0 else None)

    def save_state(self, directory) -> None:
        """Model and optimizer through torch.distributed.checkpoint: sharded, and reshardable on load."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # Frozen parameters (a LoRA run's base model) are not written: the checkpoint holds what trains.
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=_dcp_options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))

    def load_state(self, directory) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=_dcp_options())
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(directory))
        # Not strict: frozen (base) weights are absent by design. Every trainable tensor was requested
        # from the checkpoint above, and dcp.load fails if any of them is missing there.
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_dcp_options(strict=False))


class FSDPEngine(Engine):
    """torch FSDP2: fully_shard each decoder layer, then the root (the loss module, which owns embeddings and head)."""

    def __init__(self, module: nn.Module, cfg: ParallelConfig, optim_cfg: OptimConfig, total_steps: int, device, world: int,
                 full_state: dict | None = None):
        """`module` may be a meta-device skeleton: it is sharded first, then materialised and filled from
        `full_state`, the complete state dict that only rank 0 holds (every other rank passes {})."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype), reduce_dtype=_dtype(cfg.reduce_dtype))
        offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
        for layer in decoder_layers(module):
            fully_shard(layer, mp_policy=mp, offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(module, mp_policy=mp, offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward)
        if full_state is not None:
            _fill_from_rank0(module, full_state, device, cfg.cpu_offload)
        self.module = module
        self.wrapped = module
        self.device = device
        self.world = world
        self.optim_cfg = optim_cfg
        self.optimizer = build_optimizer(module, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)

    def forward_backward(self, mb: MicroBatch, scale: float, last_micro: bool) -> float:
        # Reduce-scatter only on the last micro-step; earlier ones accumulate unsharded local gradients.
        self.module.set_requires_gradient_sync(last_micro)
        loss_sum = self.module(**_to(mb, self.device))
        (loss_sum * (scale * self.world)).backward()
        return float(loss_sum.detach())


def _fill_from_rank0(module: nn.Module, full_state: dict, device, offloaded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from sft.metrics import peak_memory_gb
    from sft.model import reinit_nonpersistent_buffers

    module.to_empty(device="cpu" if offloaded else device)
    set_model_state_dict(module, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        reinit_nonpersistent_buffers(module, device)
    log.info("sharded model materialised from rank 0's copy; peak host memory of this process %.2f GB", peak_memory_gb())


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    lm = module.lm
    layers = getattr(lm.get_decoder(), "layers", None)
    if layers is None:
        raise SFTError(f"{type(lm).__name__}: no decoder `layers` list to shard")
    return list(layers)


def _to(mb: MicroBatch, device) -> dict:
    out = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.model_inputs().items()}
    out["labels"] = mb.labels.to(device)
    return out


def build_engine(module: nn.Module, cfg: ParallelConfig, optim_cfg: OptimConfig, total_steps: int, device, world: int,
                 micro_rows: int = 1, accumulation: int = 1, full_state: dict | None = None):
    if cfg.strategy in ("single", "ddp"):
        return Engine(module, optim_cfg, total_steps, device, world, ddp=cfg.strategy == "ddp" and world > 1)
    if cfg.strategy == "fsdp":
        return FSDPEngine(module, cfg, optim_cfg, total_steps, device, world, full_state)
    from sft.zero3 import ZeroEngine

    return ZeroEngine(module.to(device), cfg, optim_cfg, total_steps, device, world, micro_rows, accumulation)
