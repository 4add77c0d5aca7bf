"""The only module that distributes the model: single process, DDP, torch FSDP2 or DeepSpeed ZeRO-3.

`build_engine` builds the model the way each strategy needs it (a full copy per process; a
meta-device skeleton filled from rank 0's copy for FSDP2; partitioned at construction for ZeRO-3)
and returns an engine with one interface (`TrainEngine`) that the loop drives without knowing
which strategy it has. Gradients are always d(sum of token losses / global target tokens): the
data-parallel averaging that DDP, FSDP and DeepSpeed apply is undone by scaling the loss by the
world size, so the update does not depend on how many processes share the batch.

Precision (one table for every engine, see `Precision`): trained parameters, their gradients and
the optimizer state live in `master_dtype` (fp32 by default, so a 1e-5 update is not rounded away);
the forward and backward compute in `param_dtype` (bf16 on GPUs); frozen weights (a LoRA base)
stay in the dtype they were loaded in (`model.dtype`).
"""

from __future__ import annotations

import abc
import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from sft.errors import SFTError
from sft.loader import MicroBatch
from sft.optim import OptimConfig, build_optimizer, build_scheduler

log = logging.getLogger(__name__)
STRATEGIES = ("single", "ddp", "fsdp", "zero3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ParallelConfig:
    strategy: str = "single"  # single | ddp | fsdp | zero3
    # Compute dtype of the forward and backward (FSDP2's all-gather dtype, DeepSpeed's bf16, autocast under
    # single/ddp). None: the dtype the model is loaded in (model.dtype).
    param_dtype: Optional[str] = None
    reduce_dtype: str = "float32"  # dtype gradients are reduced and accumulated in (fsdp, zero3)
    # Trained parameters, their gradients and AdamW moments. bfloat16 is pure bf16 training: half the memory of
    # these three, but an update smaller than ~1/256 of a weight is rounded away (most updates at lr 1e-5).
    master_dtype: str = "float32"
    # FSDP2: keep accumulated gradients unsharded between micro-steps and reduce-scatter once per step.
    # Less communication, but every rank then holds reduce_dtype bytes x ALL parameters (282 GB at 70B).
    accumulate_unsharded: bool = False
    cpu_offload: bool = False  # parameters, gradients and optimizer state in host memory
    reshard_after_forward: bool = True  # FSDP2: free gathered layers after forward (ZeRO-3 behaviour)
    zero3_bucket_size: int = 50_000_000  # DeepSpeed reduce/prefetch bucket sizes, in elements


@dataclass(frozen=True)
class Precision:
    master: torch.dtype  # trained parameters, gradients, optimizer state
    compute: torch.dtype  # forward/backward matmuls
    reduce: torch.dtype  # gradient reduction
    frozen: torch.dtype  # weights that are not trained


def precision_of(cfg: ParallelConfig, model_dtype: str) -> Precision:
    return Precision(master=DTYPES[cfg.master_dtype], compute=DTYPES[cfg.param_dtype or model_dtype],
                     reduce=DTYPES[cfg.reduce_dtype], frozen=DTYPES[model_dtype])


def needs_process_group(cfg: ParallelConfig) -> bool:
    """Sharded engines need a process group even on one process (FSDP2's mesh, DeepSpeed's comm)."""
    return cfg.strategy in ("fsdp", "zero3")


def validate_parallel_config(cfg: ParallelConfig, world: int, model_dtype: str = "float32") -> None:
    if cfg.strategy not in STRATEGIES:
        raise SFTError(f"parallelism.strategy={cfg.strategy!r}: expected one of {', '.join(STRATEGIES)}")
    for key in ("param_dtype", "reduce_dtype", "master_dtype"):
        value = getattr(cfg, key)
        if value is not None and value not in DTYPES:
            raise SFTError(f"parallelism.{key}={value!r}: expected one of {', '.join(DTYPES)} "
                           "(float16 needs loss scaling, which sft does not do: use bfloat16)")
    if model_dtype not in DTYPES:
        raise SFTError(f"model.dtype={model_dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.strategy == "single" and world > 1:
        raise SFTError(
            f"parallelism=single but the launcher started {world} processes; "
            "choose parallelism=ddp, fsdp or zero3, or launch one process"
        )
    if cfg.cpu_offload and cfg.strategy not in ("fsdp", "zero3"):
        raise SFTError("parallelism.cpu_offload needs parallelism=fsdp or zero3")
    if cfg.strategy in ("single", "ddp") and cfg.reduce_dtype != cfg.master_dtype:
        # DDP all-reduces gradients in their own dtype; a different reduce dtype would be silently ignored.
        raise SFTError(f"parallelism.reduce_dtype={cfg.reduce_dtype} takes effect only with fsdp or zero3; under "
                       f"{cfg.strategy} gradients are reduced in parallelism.master_dtype={cfg.master_dtype}")
    if cfg.accumulate_unsharded and cfg.strategy != "fsdp":
        raise SFTError("parallelism.accumulate_unsharded applies to parallelism=fsdp only")
    if cfg.strategy == "zero3" and cfg.master_dtype != "float32":
        raise SFTError("parallelism.master_dtype=bfloat16 (pure bf16) is available with fsdp, ddp and single; "
                       "DeepSpeed ZeRO-3 keeps fp32 master weights")
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


def to_device(mb: MicroBatch, device) -> dict:
    """The one place a micro-batch moves to the device. Target positions are found on the host (labels are
    still there), so selecting them on the device needs no synchronisation."""
    from sft.templating import IGNORE_INDEX

    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in mb.model_inputs().items()}
    flat = mb.labels.reshape(-1)
    out["labels"] = mb.labels.to(device, non_blocking=True)
    out["target_index"] = (flat != IGNORE_INDEX).nonzero().squeeze(1).to(device, non_blocking=True)
    return out


def export_dtype(t: torch.Tensor, precision: Precision, trainable_only: bool) -> torch.Tensor:
    """A whole exported model is written in the dtype it was loaded in (bf16 for the GPU models: a 70B export
    in fp32 master precision would be twice the size); an adapter-only export keeps its master dtype."""
    return t.to(precision.frozen) if (t.is_floating_point() and not trainable_only) else t


class TrainEngine(abc.ABC):
    """What the loop, evaluation, checkpointing and export may ask of any engine."""

    module: nn.Module  # the ChunkedLossLM (sharded or not); a forward through it gathers what it needs
    device: torch.device
    world: int
    precision: Precision
    scheduler: object
    can_generate: bool = False  # the whole model on every rank and no collective per module call

    @abc.abstractmethod
    def forward_backward(self, mb: MicroBatch, scale: float, last_micro: bool, num_chunks: int | None = None) -> torch.Tensor:
        """Add d(scale x summed loss of `mb`)/d(params) to the gradients; returns the summed loss, detached, on the device."""

    @abc.abstractmethod
    def clip_and_step(self) -> torch.Tensor:
        """Clip the global gradient norm to optim.grad_clip, apply the update, step the schedule, clear the
        gradients; returns the norm before clipping (on the device: read it only when logging)."""

    @property
    @abc.abstractmethod
    def lr(self) -> float: ...

    @abc.abstractmethod
    def save_state(self, directory) -> None: ...

    @abc.abstractmethod
    def load_state(self, directory) -> None: ...

    @abc.abstractmethod
    def iter_full_tensors(self, trainable_only: bool = False):
        """(name, full CPU tensor) keyed like module_for_export(), one tensor at a time; rank 0 gets the
        tensors, other ranks None. Every rank must consume the whole iterator (sharded engines gather)."""

    def module_for_export(self) -> nn.Module:
        """The LM (or its PEFT wrapper) whose keys iter_full_tensors() uses."""
        return self.module.model

    def release_optimizer(self) -> None:
        """Free gradients and optimizer state once training is over (before the export gathers tensors)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()

    def compute_context(self):
        """Wraps every forward (training, eval, probe): autocast where the engine does not cast by itself."""
        return contextlib.nullcontext()

    def loss_sum(self, mb: MicroBatch) -> torch.Tensor:
        """Summed loss of `mb` without gradients (evaluation); every rank calls it the same number of times."""
        with torch.no_grad(), self.compute_context():
            return self.module(**to_device(mb, self.device)).detach()


def _dcp_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


class TorchEngineMixin:
    """What single, DDP and FSDP2 share: a torch optimizer, state through torch.distributed.checkpoint
    (sharded, and reshardable on load), clipping, and export tensor by tensor (a DTensor shard is
    all-gathered one tensor at a time)."""

    def save_state(self, directory) -> None:
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

    def clip_and_step(self) -> torch.Tensor:
        return self._step_optimizer([p for p in self.module.parameters() if p.requires_grad])

    def iter_full_tensors(self, trainable_only: bool = False):
        from sft import distributed as D

        trainable = {n for n, p in self.module.model.named_parameters() if p.requires_grad}
        for name, value in self.module.model.state_dict().items():
            if trainable_only and name not in trainable:
                continue
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            yield name, (export_dtype(value.detach().cpu(), self.precision, trainable_only).clone() if D.rank() == 0 else None)

    def _step_optimizer(self, params) -> torch.Tensor:
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        # foreach kernels are fast on CUDA; on CPU/gloo they reject DTensors of mixed placements.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=self.device.type == "cuda")
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class Engine(TorchEngineMixin, TrainEngine):
    """Single process and DDP. A compute dtype below the master dtype runs under autocast."""

    can_generate = True

    def __init__(self, module: nn.Module, precision: Precision, optim_cfg: OptimConfig, total_steps: int, device,
                 world: int, ddp: bool):
        if precision.compute == torch.float32:  # fp32 compute asked for: a bf16-loaded frozen base computes in fp32 too
            for p in module.parameters():
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        self.module = module.to(device)
        self.device = device
        self.world = world
        self.precision = precision
        self.optim_cfg = optim_cfg
        self.wrapped = module
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = build_optimizer(self.module, optim_cfg, device)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)

    def compute_context(self):
        if self.precision.compute == torch.float32 or self.precision.compute == self.precision.master == self.precision.frozen:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.compute)

    def forward_backward(self, mb: MicroBatch, scale: float, last_micro: bool, num_chunks: int | None = None) -> torch.Tensor:
        sync = contextlib.nullcontext() if last_micro or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
        with sync:
            with self.compute_context():
                loss_sum = self.wrapped(**to_device(mb, self.device), num_chunks=num_chunks)
            (loss_sum * (scale * self.world)).backward()
        return loss_sum.detach()



@dataclass
class EngineSpec:
    """Everything an engine is built from (plain dataclasses: no Hydra needed, e.g. by bench/gpu_check.py)."""

    model: object  # sft.model.ModelConfig
    peft: object  # sft.model.PeftConfig
    parallel: ParallelConfig
    optim: OptimConfig
    loss_chunk_mb: float
    total_steps: int
    world: int = 1
    micro_rows: int = 1
    accumulation: int = 1
    seed: int = 0


def build_loss_module(spec: EngineSpec, tokenizer, device="cpu", master_cast: bool = True) -> nn.Module:
    """Model (from a checkpoint, from config, or on "meta") -> PEFT -> master dtype for what trains -> loss module."""
    from sft.loss import ChunkedLossLM, loss_chunk_tokens
    from sft.model import apply_peft, build_model, causal_lm

    torch.manual_seed(spec.seed)
    model = build_model(spec.model, tokenizer, device, quantize_4bit=spec.peft.method == "qlora")
    model = apply_peft(model, spec.peft)
    if master_cast:
        master = DTYPES[spec.parallel.master_dtype]
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != master:
                p.data = p.data.to(master)
    # From the config: under zero.Init the output weight is an empty partitioned placeholder.
    vocab = causal_lm(model).config.vocab_size
    module = ChunkedLossLM(model, loss_chunk_tokens(vocab, spec.loss_chunk_mb))
    # from_pretrained returns the model in eval mode, where Hugging Face decoder layers skip activation
    # checkpointing (and dropout): a run loaded from model.path would keep every layer's activations until
    # its first evaluation (the GPU check measured 31 GiB instead of 22 for a 1.2B model on one GPU).
    module.train()
    return module


def build_engine(spec: EngineSpec, tokenizer, device) -> TrainEngine:
    """The model, built the way the strategy needs it, inside its engine.

    FSDP2 never builds the full model on every rank: all ranks shard a meta-device skeleton and
    rank 0 alone loads the weights (in model.dtype), which reach the other ranks tensor by tensor.
    ZeRO-3 loading a checkpoint partitions at construction (zero.Init through transformers'
    DeepSpeed integration); DeepSpeed keeps the fp32 master copy itself.
    """
    from sft import distributed as D

    par = spec.parallel
    precision = precision_of(par, spec.model.dtype)
    if par.strategy in ("single", "ddp"):
        return Engine(build_loss_module(spec, tokenizer), precision, spec.optim, spec.total_steps, device, spec.world,
                      ddp=par.strategy == "ddp" and spec.world > 1)
    if par.strategy == "fsdp":
        from sft.fsdp import FSDPEngine

        full_state = build_loss_module(spec, tokenizer, master_cast=False).state_dict() if D.rank() == 0 else {}
        return FSDPEngine(build_loss_module(spec, tokenizer, "meta"), par, precision, spec.optim, spec.total_steps, device,
                          spec.world, full_state)
    from sft.zero3 import ZeroEngine, zero_init_scope

    scope = zero_init_scope(spec, precision) if spec.model.path is not None else contextlib.nullcontext()
    with scope:  # under zero.Init parameters are partitioned placeholders: DeepSpeed casts them itself
        module = build_loss_module(spec, tokenizer, master_cast=spec.model.path is None)
    return ZeroEngine(module.to(device), spec, precision, device)
