"""`python -m sft.plan` (`sft-plan`): before a run is queued, will it fit, how long will it take, what will it train on?

Takes the same config and overrides as `sft.train`, plus `cluster.*` (the machines planned for), and
never touches a GPU or downloads anything beyond the model's config and tokenizer files:

    python -m sft.plan experiment=llama3_70b_full cluster.nodes=8 cluster.gpus_per_node=8

It refuses what sft.train refuses (sft.config.validate, same messages), prints the memory each GPU
holds item by item (sft.memory), host memory and disk, FLOPs per token and hours per epoch at an
assumed MFU, and renders examples with the trained tokens marked (sft.plan_data). Writes plan.json
(`plan.out`). Exit status: 0 when the run fits, 1 when it does not (after the whole report), 2 for
a refused configuration.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from sft import config as C
from sft.errors import SFTError
from sft.memory import GiB, MemoryPlan, build_architecture, plan_memory

SKIP_HINT = "train.skip_memory_check=true starts anyway"
# Per-process host memory beyond the model: the Python interpreter with torch, CUDA and NCCL libraries.
PROCESS_OVERHEAD_BYTES = 3 * GiB


def _gib(x) -> float:
    return round(x / GiB, 2)


def explain(mp: MemoryPlan, title: str) -> str:
    width = max(len(k) for k in mp.items) + 2
    lines = [title]
    lines += [f"  {k:<{width}}{v / GiB:8.2f} GB" for k, v in mp.items.items()]
    lines.append(f"  {'predicted peak':<{width}}{mp.peak / GiB:8.2f} GB of {mp.capacity / GiB:.2f} GB")
    if mp.host_items:
        lines.append("  on the host (offloaded): " + ", ".join(f"{k} {v / GiB:.2f} GB" for k, v in mp.host_items.items()))
    return "\n".join(lines)


def verdict(mp: MemoryPlan) -> str:
    if mp.fits:
        return f"fits: {mp.spare / GiB:.1f} GB to spare per GPU"
    return f"does NOT fit: {-mp.spare / GiB:.1f} GB over per GPU"


# ----------------------------------------------------------------------------------------------------
# The cheapest change that makes a run fit: tried in order of how little it changes the run.


def _variants(cfg, world: int):
    """(description, modified config, world) candidates, cheapest first."""
    def tweak(fn):
        c = copy.deepcopy(cfg)
        fn(c)
        return c

    if not cfg.model.activation_checkpointing:
        yield "model.activation_checkpointing=true", tweak(lambda c: setattr(c.model, "activation_checkpointing", True)), world
    if cfg.parallelism.accumulate_unsharded:
        yield "parallelism.accumulate_unsharded=false", tweak(lambda c: setattr(c.parallelism, "accumulate_unsharded", False)), world
    mb = cfg.train.micro_batch_size
    while mb > 1:
        mb //= 2
        yield (f"train.micro_batch_size={mb} (same global batch, more accumulation)",
               tweak(lambda c, mb=mb: setattr(c.train, "micro_batch_size", mb)), world)
    if cfg.parallelism.strategy in ("fsdp", "zero3"):
        gpus = cfg.cluster.gpus_per_node
        for nodes in (2, 4, 8, 16, 32, 64, 128):
            if nodes * gpus > world:
                yield f"cluster.nodes={nodes} ({nodes * gpus} GPUs)", cfg, nodes * gpus
    elif cfg.parallelism.strategy in ("single", "ddp"):
        yield "parallelism=fsdp (shard parameters, gradients and optimizer state)", tweak(
            lambda c: setattr(c.parallelism, "strategy", "fsdp")), world
    if not cfg.parallelism.cpu_offload and cfg.parallelism.strategy in ("fsdp", "zero3"):
        yield f"parallelism={cfg.parallelism.strategy}_offload (state in host memory; slower steps)", tweak(
            lambda c: setattr(c.parallelism, "cpu_offload", True)), world
    length = cfg.data.max_length
    while length > 512:
        length //= 2
        yield f"data.max_length={length}", tweak(lambda c, n=length: setattr(c.data, "max_length", n)), world
    if cfg.peft.method == "none":
        yield "peft=lora (train adapters, freeze the base)", tweak(lambda c: setattr(c.peft, "method", "lora")), world


def _accumulation(cfg, world: int) -> int:
    try:
        return C.derive_accumulation(cfg.train, world)
    except SFTError:  # a candidate world size the global batch does not divide: the nearest whole split
        return max(1, cfg.train.global_batch_size // (cfg.train.micro_batch_size * world))


def cheapest_fix(cfg, world: int, capacity: int, arch) -> str | None:
    for what, variant, w in _variants(cfg, world):
        try:
            same_arch = variant.peft.method == cfg.peft.method
            mp = plan_memory(variant, w, capacity, arch if same_arch else None, _accumulation(variant, w))
        except SFTError:
            continue
        if mp.fits:
            return f"{what}: predicted {mp.peak / GiB:.1f} GB per GPU"
    return None


def check_memory_fits(cfg, world: int, gpu_memory_bytes: int) -> None:
    """sft.train's start-up check: refuse a run predicted not to fit the GPUs it found (every rank computes the
    same prediction from the same config, so all ranks agree without a collective)."""
    if getattr(cfg.train, "skip_memory_check", False):
        return
    accumulation = C.derive_accumulation(cfg.train, world)
    arch = build_architecture(cfg, online=True)  # the skeleton training builds next (config.json fetched if needed)
    mp = plan_memory(cfg, world, gpu_memory_bytes, arch, accumulation)
    if mp.fits:
        return
    fix = cheapest_fix(cfg, world, gpu_memory_bytes, arch)
    items = "; ".join(f"{k} {v / GiB:.1f}" for k, v in mp.items.items())
    raise SFTError(f"predicted {mp.peak / GiB:.1f} GB per GPU, more than the {gpu_memory_bytes / GiB:.1f} GB of this GPU "
                   f"({items} GB)" + (f"; cheapest fix: {fix}" if fix else "") + f". Plan it with python -m sft.plan; {SKIP_HINT}")


# ----------------------------------------------------------------------------------------------------
# Host memory, disk, time.


def host_and_disk(cfg, arch, world: int, mp: MemoryPlan) -> dict:
    from sft.memory import _bytes

    par = cfg.parallelism
    model_bytes = sum(p.numel * _bytes(_frozen_dtype(cfg)) for p in arch.params)  # weights as loaded (model.dtype)
    trained = [p for p in arch.params if p.trainable]
    gpus = min(world, cfg.cluster.gpus_per_node)
    overhead = gpus * PROCESS_OVERHEAD_BYTES
    offloaded = gpus * sum(mp.host_items.values())
    if par.strategy == "fsdp":
        load = model_bytes  # rank 0 alone holds the full state dict; the others shard a meta skeleton
        how = "rank 0 loads one full copy (model.dtype) and sends each shard; other ranks hold no copy"
    elif par.strategy == "zero3":
        load = gpus * min(model_bytes, 5 * GiB)  # zero.Init: each rank reads one checkpoint file at a time
        how = "every rank reads one checkpoint shard file (<= ~5 GB on the Hub) at a time, partitioned at construction"
    else:
        load = gpus * model_bytes
        how = "every rank builds its own full copy on the host before moving it to its GPU"
    peak_host = load + offloaded + overhead
    master_bytes = sum(p.numel * _bytes(p.dtype) for p in trained)
    if par.strategy == "zero3":
        lp = 2 if mp.state.master else 0
        ckpt = sum(p.numel for p in trained) * (12 + lp)
    else:
        ckpt = 3 * master_bytes  # DCP: trained weights + exp_avg + exp_avg_sq (frozen weights are not written)
    # final/: a whole model in the dtype it was loaded in (sft.parallel.export_dtype); a LoRA run's adapters only,
    # in their master dtype.
    export = master_bytes if cfg.peft.method != "none" else model_bytes
    keep = max(1, cfg.checkpoint.keep) if cfg.checkpoint.keep else 1
    out = {"host_memory_gb": _gib(peak_host), "host_loading": how, "checkpoint_gb": _gib(ckpt),
           "checkpoints_kept_gb": _gib(ckpt * keep), "checkpoints_while_saving_gb": _gib(ckpt * (keep + 1)),
           "export_gb": _gib(export), "checkpoint_keep": keep}
    if cfg.cluster.host_memory_gb:
        out["host_fits"] = peak_host <= cfg.cluster.host_memory_gb * GiB
    if cfg.cluster.disk_gb:
        out["disk_fits"] = ckpt * (keep + 1) + export <= cfg.cluster.disk_gb * GiB
    return out


def _frozen_dtype(cfg):
    from sft.memory import _dtype

    return _dtype(cfg.model.dtype)


def timing(cfg, arch, world: int, lengths) -> dict:
    import numpy as np

    per_gpu = cfg.cluster.peak_tflops * 1e12 * cfg.cluster.assumed_mfu
    if lengths is None:
        at_max = arch.flops.per_token([cfg.data.max_length])
        return {"flops_per_token": at_max, "flops_per_token_basis": f"one document of data.max_length={cfg.data.max_length}",
                "tokens_per_epoch": None, "hours_per_epoch": None}
    lengths = np.asarray(lengths)
    tokens = float(lengths.sum())
    fpt = arch.flops.per_token(lengths)
    hours = tokens * fpt / (world * per_gpu) / 3600
    return {"flops_per_token": fpt, "flops_per_token_basis": "the training split's document lengths",
            "tokens_per_epoch": int(tokens), "hours_per_epoch": round(hours, 3),
            "hours_total": round(hours * cfg.train.epochs, 3) if cfg.train.max_steps < 0 else None}


# ----------------------------------------------------------------------------------------------------


def validate_for_plan(cfg, world: int) -> tuple[int, list[str]]:
    """sft.config.validate with world = nodes x gpus_per_node. What depends on the machine the plan runs on
    (a CUDA device, flash-attn, bitsandbytes) is checked on the training nodes, not here: listed instead."""
    from sft.model import VARLEN_BACKENDS

    check = copy.deepcopy(cfg)
    deferred = []
    if check.model.attn_implementation in VARLEN_BACKENDS:
        deferred.append(f"model.attn_implementation={check.model.attn_implementation} needs a CUDA GPU with flash-attn "
                        "installed on the training nodes")
        check.model.attn_implementation = "sdpa"
    if check.peft.method == "qlora":
        deferred.append("peft=qlora needs bitsandbytes and CUDA on the training nodes")
        if check.parallelism.strategy == "zero3":
            raise SFTError("peft=qlora with parallelism=zero3 is not supported; use fsdp or lora")
        check.peft.method = "lora"
    return C.validate(check, world), deferred


def run_plan(cfg, stream=sys.stdout) -> tuple[dict, int]:
    from sft import plan_data

    cl = cfg.cluster
    world = cl.nodes * cl.gpus_per_node
    say = lambda *a: print(*a, file=stream)  # noqa: E731
    accumulation, deferred = validate_for_plan(cfg, world)
    capacity = int(cl.gpu_memory_gb * GiB)
    arch = build_architecture(cfg)
    say(f"sft plan: {cfg.run.name} on {cl.nodes} node(s) x {cl.gpus_per_node} GPUs ({world} ranks, {cl.gpu_memory_gb:g} GB each), "
        f"parallelism={cfg.parallelism.strategy}, peft={cfg.peft.method}, micro-batch {cfg.train.micro_batch_size} x "
        f"{cfg.data.max_length} tokens, accumulation {accumulation}")
    trained = arch.numel(True)
    say(f"model: {arch.numel() / 1e9:.2f}B parameters ({trained / 1e6:.1f}M trained), {arch.layers} layers, "
        f"vocabulary {arch.vocab_size}; attention {cfg.model.attn_implementation}")
    for d in deferred:
        say(f"checked on the training nodes, not here: {d}")
    mp = plan_memory(cfg, world, capacity, arch, accumulation)
    say("")
    say(explain(mp, "memory per GPU (rank 0, the largest shard):"))
    say(f"verdict: {verdict(mp)}")
    fix = None if mp.fits else cheapest_fix(cfg, world, capacity, arch)
    if not mp.fits:
        say(f"cheapest change that fits: {fix or 'none found among checkpointing, micro-batch, nodes, offload, max_length, LoRA'}")
    hd = host_and_disk(cfg, arch, world, mp)
    say("")
    say(f"host memory per node while loading: {hd['host_memory_gb']} GB ({hd['host_loading']})")
    say(f"checkpoint: {hd['checkpoint_gb']} GB each, {hd['checkpoints_kept_gb']} GB for checkpoint.keep={hd['checkpoint_keep']} "
        f"({hd['checkpoints_while_saving_gb']} GB while the next is written); final export {hd['export_gb']} GB")
    data = plan_data.inspect(cfg, stream) if cfg.plan.data else plan_data.DataReport(note="plan.data=false")
    tm = timing(cfg, arch, world, data.lengths)
    say("")
    say(f"FLOPs per token: {tm['flops_per_token'] / 1e9:.2f} GFLOP ({tm['flops_per_token_basis']}; the formula of the logged MFU)")
    if tm["hours_per_epoch"] is None:
        say(f"time per epoch: unknown ({data.note or 'no data'})")
    else:
        say(f"tokens per epoch: {tm['tokens_per_epoch']:,}; at MFU {cl.assumed_mfu:.0%} of {cl.peak_tflops:g} TFLOP/s per GPU: "
            f"{tm['hours_per_epoch']:.2f} h per epoch" + (f", {tm['hours_total']:.2f} h for {cfg.train.epochs} epochs"
                                                          if tm.get("hours_total") else ""))
    report = {
        "fits": mp.fits, "memory_per_gpu_gb": _gib(mp.peak), "gpu_memory_gb": cl.gpu_memory_gb, "spare_gb": _gib(mp.spare),
        "memory": {k: _gib(v) for k, v in mp.items.items()}, "host_offloaded_gb": {k: _gib(v) for k, v in mp.host_items.items()},
        "cheapest_fix": fix, "world": world, "accumulation": accumulation, "parameters": arch.numel(),
        "trained_parameters": trained, **hd, **tm, "data": data.summary, "refusals": data.refusals,
        "checked_on_training_nodes": deferred,
    }
    ok = mp.fits and not data.refusals and hd.get("host_fits", True) and hd.get("disk_fits", True)
    for r in data.refusals:
        say(f"refused: {r}")
    Path(cfg.plan.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.plan.out).expanduser().write_text(json.dumps(report, indent=2, default=str) + "\n")
    say(f"\nwritten: {cfg.plan.out}")
    return report, 0 if ok else 1


def compose_from_argv(argv: list[str]):
    """The config exactly as `python -m sft.train ARGV` composes it (Hydra's compose API: no run directory is made)."""
    from hydra import compose, initialize_config_dir

    C.register()
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_object(compose(config_name="config", overrides=list(argv)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if len(argv) >= 2 and argv[0] == "--default-experiment":  # the Slurm scripts' preset, unless an override names one
        preset, argv = argv[1], argv[2:]
        if preset and not any(a.lstrip("+").startswith("experiment=") for a in argv):
            argv = [f"experiment={preset}", *argv]
    try:
        cfg = compose_from_argv(argv)
        _, code = run_plan(cfg)
    except SFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a Hydra override error: one line, like sft.train
        if type(exc).__module__.startswith(("hydra", "omegaconf")):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return code


if __name__ == "__main__":
    sys.exit(main())
