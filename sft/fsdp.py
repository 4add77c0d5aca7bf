"""torch FSDP2: fully_shard each decoder layer, then the root (the loss module, which owns embeddings and head).

Gradients stay sharded: every micro-step reduce-scatters its gradients into the fp32 shard each
rank owns (as torchtitan does). Turning the sync off between micro-steps would make FSDP2 keep
*unsharded* gradients in the reduce dtype on every rank (4 bytes x all parameters: 282 GB at 70B),
so that is only available as `parallelism.accumulate_unsharded`, a named memory-for-bandwidth trade.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from sft.errors import SFTError
from sft.loader import MicroBatch
from sft.optim import OptimConfig, build_optimizer, build_scheduler
from sft.parallel import ParallelConfig, Precision, TorchEngineMixin, TrainEngine, to_device

log = logging.getLogger(__name__)


class FSDPEngine(TorchEngineMixin, TrainEngine):
    def __init__(self, module: nn.Module, cfg: ParallelConfig, precision: Precision, optim_cfg: OptimConfig, total_steps: int,
                 device, world: int, full_state: dict | None = None):
        """`module` may be a meta-device skeleton: it is sharded first, then materialised and filled from
        `full_state`, the complete state dict that only rank 0 holds (every other rank passes {})."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        # Shards keep the dtype the skeleton has (master dtype for what trains); the policy casts them to the
        # compute dtype at each all-gather and reduces gradients in the reduce dtype.
        mp = MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=precision.reduce)
        offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
        for layer in decoder_layers(module):
            fully_shard(layer, mp_policy=mp, offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(module, mp_policy=mp, offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward)
        if full_state is not None:
            _fill_from_rank0(module, full_state, device, cfg.cpu_offload)
        self.module = module
        self.device = device
        self.world = world
        self.precision = precision
        self.optim_cfg = optim_cfg
        self.accumulate_unsharded = cfg.accumulate_unsharded
        self.optimizer = build_optimizer(module, optim_cfg, device)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)

    def forward_backward(self, mb: MicroBatch, scale: float, last_micro: bool, num_chunks: int | None = None) -> torch.Tensor:
        if self.accumulate_unsharded:
            self.module.set_requires_gradient_sync(last_micro)
        loss_sum = self.module(**to_device(mb, self.device), num_chunks=num_chunks)
        (loss_sum * (scale * self.world)).backward()
        return loss_sum.detach()


def _fill_from_rank0(module: nn.Module, full_state: dict, device, offloaded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from sft.metrics import peak_memory_gb
    from sft.model import reinit_nonpersistent_buffers

    module.to_empty(device="cpu" if offloaded else device)
    # Tensor by tensor; each shard copies (and casts: rank 0's bf16 checkpoint -> fp32 master shards) its slice.
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
