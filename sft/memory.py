"""What each GPU holds during training under this project's recipe: the preflight's memory model.

Counted from the real architecture built on the meta device (every parameter's shape and dtype,
after PEFT and the master-dtype cast that `sft.parallel.build_loss_module` applies), not from a
parameter-count formula, and following what each engine really allocates:

- FSDP2 (`fully_shard` per decoder layer, then the root): each tensor is split on dim 0 into
  `world` chunks of ceil(dim0 / world) rows; a rank's parameter storage is that padded chunk, its
  AdamW moments are `zeros_like` its unpadded chunk, and gradients are reduce-scattered into the
  padded shard every micro-step (or held unsharded in the reduce dtype with
  `parallelism.accumulate_unsharded`). Layers are all-gathered in the compute dtype one at a time
  (plus the next one, prefetched); the root (embeddings, final norm, output layer) stays gathered
  from the start of the forward to the end of the backward.
- ZeRO-3 (DeepSpeed 0.19 stage 3, read from its source): every tensor is flattened and split into
  ceil(numel / world) partitions (bf16 in DeepSpeed's bf16 mode); trained partitions live in one flat
  buffer, the fp32 master copy in another (a separate copy even when the partitions are fp32:
  measured), gradients in a flat partition buffer in `grad_accum_dtype`, the reduce bucket holds
  `reduce_bucket_size` elements in `communication_data_type`; the fp32 gradient the optimizer steps
  on (the largest sub-group) exists only during the step; parameters are gathered per submodule call.
- single / DDP: whole tensors; DDP's reducer keeps its gradient buckets as a second copy of the
  trained gradients; autocast keeps one compute-dtype copy of each trained weight during a forward.

Sizes are GiB (2**30 bytes), the unit nvidia-smi and torch report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GiB = 2**30
# Memory a GPU process uses outside torch's allocator: the CUDA context with cuBLAS/cuDNN workspaces
# (~0.5-1 GiB on H100 with torch 2.x), and NCCL's communicator buffers (channels x peers x 4 MiB,
# ~0.5-1.5 GiB at 8 GPUs per node). Stated allowances, not measurements of this machine.
CUDA_CONTEXT_BYTES = 1 * GiB
NCCL_BYTES = 1 * GiB
# The caching allocator rounds and splits blocks; with expandable segments (slurm/env.sh sets them) the
# reserved-over-allocated overhead of a training step is a few percent.
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor of the skeleton as the recipe holds it."""

    name: str
    shape: tuple
    dtype: torch.dtype  # dtype after the recipe's casts (master dtype if trained, model.dtype if frozen)
    trainable: bool
    layer: int  # decoder layer index, or -1 for the root (embeddings, final norm, output layer)

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def dim0(self) -> int:
        return self.shape[0] if self.shape else 1


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


@dataclass
class Architecture:
    params: list[ParamSpec]
    hf_config: object
    vocab_size: int
    flops: object  # sft.flops.ModelFlops of this skeleton (LoRA: frozen base at 4, adapters at 6)
    input_embedding: str  # name of the input embedding weight (its gradient appears last in backward)

    @property
    def layers(self) -> int:
        return 1 + max((p.layer for p in self.params), default=-1)

    def numel(self, trainable: bool | None = None) -> int:
        return sum(p.numel for p in self.params if trainable is None or p.trainable == trainable)


def build_architecture(cfg, online: bool = False) -> Architecture:
    """The recipe's model on the meta device: the offline skeleton (sft.model.build_skeleton: the checkpoint's
    config.json when it is here, else model.arch), PEFT applied, trained tensors cast to the master dtype as
    sft.parallel.build_loss_module does. No memory, no download; `online` (sft.train's start-up check) reads
    the config training reads (sft.model.build_hf_config: config.json fetched when it is not here)."""
    from sft.flops import model_flops
    from sft.model import apply_peft, build_skeleton, causal_lm

    model = apply_peft(_online_skeleton(cfg.model) if online else build_skeleton(cfg.model), cfg.peft)
    master = _dtype(cfg.parallelism.master_dtype)
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != master:
            p.data = p.data.to(master)
    lm = causal_lm(model)
    layer_of = {}
    for i, layer in enumerate(lm.get_decoder().layers):
        for p in layer.parameters():
            layer_of[id(p)] = i
    embedding = lm.get_input_embeddings().weight
    params, embed_name = [], ""
    for name, p in model.named_parameters():
        params.append(ParamSpec(name, tuple(p.shape), p.dtype, p.requires_grad, layer_of.get(id(p), -1)))
        if p is embedding:
            embed_name = name
    vocab = lm.get_output_embeddings().weight.shape[0]
    return Architecture(params, lm.config, vocab, model_flops(model), embed_name)


def _online_skeleton(model_cfg):
    """The skeleton from the config training uses (sft.model.build_hf_config: config.json fetched if needed); the
    attention backend does not change any parameter, so the one every machine has builds it."""
    from transformers import AutoModelForCausalLM

    from sft.model import DTYPES, build_hf_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(build_hf_config(model_cfg), attn_implementation="sdpa",
                                                dtype=DTYPES[model_cfg.dtype])


# ----------------------------------------------------------------------------------------------------
# Persistent state per rank: parameters, gradients, optimizer state (the part tests check to the byte).


@dataclass
class StateBytes:
    params: int = 0  # parameter storage (trained in master dtype, frozen in model.dtype; ZeRO-3: its partitions)
    master: int = 0  # a separate fp32 master copy (ZeRO-3 with bf16 partitions)
    grads: int = 0  # gradient storage between micro-steps
    optimizer: int = 0  # AdamW exp_avg + exp_avg_sq (+ its step counters)
    buffers: int = 0  # engine buffers: DDP buckets, ZeRO-3 reduce bucket and fp32 step gradient buffer
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.params + self.master + self.grads + self.optimizer + self.buffers


def _chunk_rows(dim0: int, world: int, rank: int) -> int:
    """torch.chunk semantics, which FSDP2 uses: ceil-sized chunks, the last ones short or empty."""
    c = -(-dim0 // world)
    return max(0, min(c, dim0 - rank * c))


STEP_BYTES = 4  # torch AdamW keeps `step` as a 0-dim fp32 tensor per parameter


def fsdp_state(arch: Architecture, par, world: int, rank: int = 0, accumulation: int = 2) -> StateBytes:
    s = StateBytes()
    reduce_bytes = _bytes(_dtype(par.reduce_dtype))
    for p in arch.params:
        padded = -(-p.dim0 // world) * p.row_numel
        s.params += padded * _bytes(p.dtype)
        if not p.trainable:
            continue
        s.grads += padded * _bytes(p.dtype)  # reduce-scatter output, cast to the shard's dtype
        s.optimizer += 2 * _chunk_rows(p.dim0, world, rank) * p.row_numel * _bytes(p.dtype) + STEP_BYTES
        if par.accumulate_unsharded and accumulation > 1:  # FSDP2's unsharded accumulation buffer, reduce dtype, whole tensor
            s.buffers += p.numel * reduce_bytes
    return s


def ddp_state(arch: Architecture, par, world: int) -> StateBytes:
    s = StateBytes()
    for p in arch.params:
        s.params += p.numel * _bytes(p.dtype)
        if p.trainable:
            s.grads += p.numel * _bytes(p.dtype)
            s.optimizer += 2 * p.numel * _bytes(p.dtype) + STEP_BYTES
            if par.strategy == "ddp" and world > 1:
                s.buffers += p.numel * _bytes(p.dtype)  # the reducer's flat buckets (gradient_as_bucket_view=False)
    return s


def zero3_state(arch: Architecture, ds_config: dict, world: int) -> StateBytes:
    """DeepSpeed 0.19 stage 3 per rank (stage3.py: _create_fp16_partitions / _create_fp32_partitions /
    initialize_optimizer_states / grad_partitions_flat_buffer / ipg bucket)."""
    s = StateBytes()
    zero = ds_config["zero_optimization"]
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    comm = names.get(ds_config.get("communication_data_type"), torch.bfloat16 if bf16 else torch.float32)
    accum = names.get(ds_config.get("data_types", {}).get("grad_accum_dtype"), torch.bfloat16 if bf16 else torch.float32)
    offload = "offload_optimizer" in zero
    sub_group = int(zero.get("sub_group_size", 1e9))
    trained_partitions = []
    for p in arch.params:
        part = -(-p.numel // world)
        lp_dtype = torch.bfloat16 if bf16 else p.dtype  # DeepSpeed's bf16 mode partitions every weight in bf16
        s.params += part * _bytes(lp_dtype)
        if p.trainable:
            trained_partitions.append((part, lp_dtype))
    n_trained = sum(n for n, _ in trained_partitions)
    if n_trained:
        # _create_fp32_partitions: the fp32 master partitions are a copy of the flat buffer (measured separate even
        # when the partitions are fp32 already, tests/test_plan.py)
        s.master = n_trained * 4
        s.grads = n_trained * _bytes(accum)  # grad_partitions_flat_buffer
        s.buffers += int(zero.get("reduce_bucket_size", 5e8)) * _bytes(comm)  # the IPG (reduce) bucket
        groups = _zero3_groups(arch, sub_group, world)
        s.optimizer = 2 * n_trained * 4 + STEP_BYTES * len(groups)  # AdamW on one flat fp32 tensor per sub-group
        # The fp32 gradient of a sub-group exists only inside the optimizer step, when activations are gone.
        s.detail["step_gradient_buffer"] = 0 if offload else max(groups) * 4
        s.detail["zero3_subgroups"] = len(groups)
    return s


def _zero3_groups(arch: Architecture, sub_group: int, world: int) -> list[int]:
    """Element counts of DeepSpeed's flat sub-groups: each optimizer param group (matrices decayed, vectors
    not: sft.optim.param_groups) split every `sub_group_size` partition elements (_create_fp16_sub_groups)."""
    sizes = []
    for matrices in (True, False):
        parts = [-(-p.numel // world) for p in arch.params if p.trainable and (len(p.shape) >= 2) == matrices]
        if not parts:
            continue
        if sub_group >= sum(parts):
            sizes.append(sum(parts))
            continue
        current = 0
        for i, part in enumerate(parts):
            current += part
            if current >= sub_group or i == len(parts) - 1:
                sizes.append(current)
                current = 0
    return sizes


def _dtype(name: str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name or "", default)


# ----------------------------------------------------------------------------------------------------
# Transient memory: gathered parameters, unsharded gradients before their reduction, autocast copies.


def _layer_sums(arch: Architecture, fn) -> tuple[int, int]:
    """(largest decoder layer's sum, root's sum) of fn(param)."""
    per_layer = [0] * arch.layers
    root = 0
    for p in arch.params:
        v = fn(p)
        if p.layer >= 0:
            per_layer[p.layer] += v
        else:
            root += v
    return max(per_layer, default=0), root


def fsdp_transient(arch: Architecture, par, world: int, compute: torch.dtype) -> dict:
    cb, rb = _bytes(compute), _bytes(_dtype(par.reduce_dtype))
    gather_layer, gather_root = _layer_sums(arch, lambda p: world * -(-p.dim0 // world) * p.row_numel * cb)
    grad_layer, _ = _layer_sums(arch, lambda p: p.numel * cb + world * -(-p.dim0 // world) * p.row_numel * rb
                                if p.trainable else 0)
    # The root's gradients (output layer, final norm) appear at the start of the backward and are reduced
    # at its end; the input embedding's appears last, when the activations are gone.
    root_grads = sum(p.numel * cb for p in arch.params if p.layer < 0 and p.trainable and p.name != arch.input_embedding)
    layers_held = arch.layers if not par.reshard_after_forward else 2  # the running layer and the prefetched next
    return {"gathered root (embeddings, norm, output layer)": gather_root,
            f"gathered decoder layers ({layers_held} at a time)": layers_held * gather_layer,
            "unsharded gradients of one layer + reduce-scatter input": grad_layer,
            "output layer gradients until the root's reduce-scatter": root_grads}


def zero3_transient(arch: Architecture, ds_config: dict, compute: torch.dtype) -> dict:
    zero = ds_config["zero_optimization"]
    cb = _bytes(compute)
    modules: dict[str, int] = {}
    for p in arch.params:  # ZeRO-3 gathers per submodule call: group the parameters by their owning module
        modules[p.name.rsplit(".", 1)[0]] = modules.get(p.name.rsplit(".", 1)[0], 0) + p.numel
    largest = max(modules.values(), default=0)
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 5e7))
    live = min(largest + prefetch, max(int(zero.get("stage3_max_live_parameters", 1e9)), largest))
    largest_trained = max((n for name, n in modules.items()
                           if any(p.trainable and p.name.startswith(name + ".") for p in arch.params)), default=0)
    return {"gathered parameters (largest module + prefetch bucket)": live * cb,
            "full gradient of the largest trained module before bucketing": largest_trained * cb}


def autocast_transient(arch: Architecture, compute: torch.dtype) -> dict:
    copies = sum(p.numel * _bytes(compute) for p in arch.params if p.trainable and p.dtype != compute)
    return {"autocast compute-dtype copies of trained weights": copies} if copies else {}


# ----------------------------------------------------------------------------------------------------
# The whole picture for one GPU.


@dataclass
class MemoryPlan:
    items: dict  # label -> bytes, in report order
    peak: int  # predicted peak bytes used on the GPU (allocator peak + fragmentation + context + NCCL)
    capacity: int
    state: StateBytes
    activations: object
    host_items: dict  # label -> bytes on the host (offloaded state)
    notes: list

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    @property
    def spare(self) -> int:
        return self.capacity - self.peak


def precision(cfg):
    from sft.parallel import precision_of

    return precision_of(cfg.parallelism, cfg.model.dtype)


def ds_config_for(cfg, world: int, accumulation: int) -> dict:
    from sft.parallel import EngineSpec
    from sft.zero3 import deepspeed_config

    spec = EngineSpec(cfg.model, cfg.peft, cfg.parallelism, cfg.optim, cfg.train.loss_chunk_mb, 1, world,
                      cfg.train.micro_batch_size, accumulation)
    return deepspeed_config(spec, precision(cfg))


def state_for(arch: Architecture, cfg, world: int, accumulation: int = 2, rank: int = 0) -> StateBytes:
    par = cfg.parallelism
    if par.strategy == "fsdp":
        return fsdp_state(arch, par, world, rank, accumulation)
    if par.strategy == "zero3":
        return zero3_state(arch, ds_config_for(cfg, world, accumulation), world)
    return ddp_state(arch, par, world)


def plan_memory(cfg, world: int, gpu_memory_bytes: int, arch: Architecture | None = None,
                accumulation: int = 1) -> MemoryPlan:
    from sft import activations as A
    from sft.loss import LOGIT_BYTES_PER_VOCAB_ENTRY, loss_chunk_tokens

    arch = arch or build_architecture(cfg)
    par = cfg.parallelism
    prec = precision(cfg)
    cb = _bytes(prec.compute)
    state = state_for(arch, cfg, world, accumulation)
    notes = []
    items: dict[str, int] = {}
    host: dict[str, int] = {}
    persistent = {"parameters": state.params, "fp32 master partitions": state.master, "gradients": state.grads,
                  "optimizer state (AdamW moments)": state.optimizer}
    if par.strategy == "fsdp" and par.accumulate_unsharded:
        persistent["unsharded gradient accumulation (accumulate_unsharded)"] = state.buffers
    elif par.strategy == "zero3":
        persistent["ZeRO-3 reduce bucket"] = state.buffers
    elif state.buffers:
        persistent["DDP gradient buckets"] = state.buffers
    if par.cpu_offload:  # FSDP2 CPUOffloadPolicy / DeepSpeed offload_param + offload_optimizer: state on the host
        for k, v in persistent.items():
            if v and not k.startswith("ZeRO-3"):
                host[k] = v
        persistent = {k: (v if k.startswith("ZeRO-3") else 0) for k, v in persistent.items()}
        notes.append("parameters, gradients and optimizer state are in host memory (cpu_offload)")
    items.update({k: v for k, v in persistent.items() if v})

    if par.strategy == "fsdp":
        transient = fsdp_transient(arch, par, world, prec.compute)
    elif par.strategy == "zero3":
        transient = zero3_transient(arch, ds_config_for(cfg, world, accumulation), prec.compute)
    else:
        transient = autocast_transient(arch, prec.compute)
    items.update({k: v for k, v in transient.items() if v})

    lora = cfg.peft.method in ("lora", "qlora")
    acts = A.estimate(arch.hf_config, compute_bytes=cb, backend=cfg.model.attn_implementation,
                      rows=cfg.train.micro_batch_size, row_tokens=cfg.data.max_length,
                      checkpointing=cfg.model.activation_checkpointing, packed=cfg.packing.strategy != "off",
                      lora_rank=cfg.peft.r if lora else 0, lora_modules=len(cfg.peft.target_modules) if lora else 0)
    tokens = cfg.train.micro_batch_size * cfg.data.max_length
    chunk = min(loss_chunk_tokens(arch.vocab_size, cfg.train.loss_chunk_mb), tokens)
    loss_chunk = LOGIT_BYTES_PER_VOCAB_ENTRY * arch.vocab_size * chunk
    label = "with" if acts.checkpointed else "without"
    items[f"activations saved for backward ({label} checkpointing, {tokens} tokens)"] = acts.saved
    # The loss chunk runs at the start of the backward, before the first layer's recompute: one or the other.
    if acts.window >= loss_chunk:
        items["one layer's backward (recompute + gradients)" if acts.checkpointed else "one layer's backward gradients"] = acts.window
    else:
        items[f"output-layer chunk ({chunk} tokens x {arch.vocab_size} vocab, fp32 logits + softmax + grad)"] = loss_chunk
    allocator = sum(items.values())
    items["allocator fragmentation (5%)"] = int(FRAGMENTATION * allocator)
    items["CUDA context + cuBLAS workspace (allowance)"] = CUDA_CONTEXT_BYTES
    if world > 1:
        items["NCCL buffers (allowance)"] = NCCL_BYTES
    return MemoryPlan(items, sum(items.values()), gpu_memory_bytes, state, acts, host, notes)
