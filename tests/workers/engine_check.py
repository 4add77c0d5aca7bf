"""One engine, driven the way the loop drives it, on 1 or 2 processes; writes what it measured to --out.

Modes:
  unequal     two optimizer steps where ranks do unequal work: one rank's micro-batches need several
              output-layer chunks, the other's one or none (a micro-batch with no target at all);
              writes the full trained weights (rank 0).
  grad_bytes  bytes of gradient storage each rank holds after a non-final micro-step (FSDP2).
  dtypes      dtypes of trained parameters, gradients, optimizer state and the compute, after one
              step, and the fraction of a weight matrix's entries that one small-lr step changed.
  recompute   how many times each decoder layer runs in one micro-step (2 = forward + the
              activation-checkpointing recompute), for a model loaded from --model-path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sft import distributed as D  # noqa: E402
from sft.loader import collate  # noqa: E402
from sft.model import ModelConfig, PeftConfig  # noqa: E402
from sft.optim import OptimConfig  # noqa: E402
from sft.parallel import EngineSpec, ParallelConfig, build_engine  # noqa: E402
from sft.templating import IGNORE_INDEX  # noqa: E402
from sft.step import accumulate_gradients  # noqa: E402

TINY_ARCH = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)


class Docs:
    """Documents of random tokens with a chosen number of trained positions (0 allowed)."""

    def __init__(self, specs, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.docs = []
        for length, trained in specs:
            ids = torch.randint(3, 260, (length,), generator=g)
            labels = torch.full((length,), IGNORE_INDEX)
            if trained:
                labels[length - trained:] = ids[length - trained:]
            self.docs.append((ids.numpy(), labels.numpy()))

    def example(self, i):
        return self.docs[i]


# Per step: rank 0's two micro-batches, then rank 1's. Rank 0 needs 3-4 chunks of 16 targets; rank 1 has a
# micro-batch with no target at all and one with a few.
DOCS = Docs([(70, 60), (40, 35), (30, 0), (20, 5), (64, 50), (33, 20), (25, 0), (12, 0)])
STEPS = [[[[0]], [[1]], [[2]], [[3]]], [[[4]], [[5]], [[6, 7]], [[3]]]]


def spec_for(args, world: int, accumulation: int) -> EngineSpec:
    model = ModelConfig(name="tiny", tokenizer=str(REPO / "sft/assets/tiny_tokenizer"), arch=dict(TINY_ARCH),
                        dtype=args.model_dtype, attn_implementation="sdpa", init_seed=0, path=args.model_path,
                        activation_checkpointing=args.checkpointing)
    par = ParallelConfig(strategy=args.strategy, param_dtype=args.param_dtype, master_dtype=args.master_dtype,
                         accumulate_unsharded=args.accumulate_unsharded)
    optim = OptimConfig(lr=args.lr, warmup_steps=0, schedule="constant", grad_clip=args.grad_clip, weight_decay=0.0)
    peft = PeftConfig(method="lora" if args.lora else "none", r=4, alpha=8)
    return EngineSpec(model, peft, par, optim, loss_chunk_mb=0.05, total_steps=10, world=world, micro_rows=1,
                      accumulation=accumulation, seed=0)


def local_grad_bytes(engine) -> int:
    """Bytes of every gradient tensor FSDP2 holds for this rank: sharded .grad, and any unsharded accumulation."""
    total, seen = 0, set()

    def add(t):
        nonlocal total
        if t is None:
            return
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()

    for p in engine.module.parameters():
        add(p.grad)
    for m in engine.module.modules():
        if hasattr(m, "_get_fsdp_state"):
            group = m._get_fsdp_state()._fsdp_param_group
            for fp in (group.fsdp_params if group else []):
                add(getattr(fp, "unsharded_accumulated_grad", None))
                unsharded = getattr(fp, "_unsharded_param", None)
                add(unsharded.grad if unsharded is not None else None)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--strategy", default="single")
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--param-dtype", default=None)
    ap.add_argument("--master-dtype", default="float32")
    ap.add_argument("--accumulate-unsharded", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from sft.parallel import needs_process_group

    rank, local_rank, world = D.init_distributed(always=needs_process_group(ParallelConfig(strategy=args.strategy)))
    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "sft/assets/tiny_tokenizer"))
    per_rank = 4 // world
    engine = build_engine(spec_for(args, world, per_rank), tokenizer, torch.device("cpu"))
    from sft.flops import model_flops

    out = {"dense_flops_per_token": model_flops(engine.module).dense_per_token}
    if args.mode == "unequal":
        for step in STEPS:
            micro = [collate(rows, DOCS, pad_id=0) for rows in step[rank * per_rank:(rank + 1) * per_rank]]
            out.setdefault("losses", []).append(accumulate_gradients(engine, micro).global_loss())
            engine.clip_and_step()
        tensors = {name: t for name, t in engine.iter_full_tensors()}
        if rank == 0:
            torch.save(tensors, args.out + ".pt")
    elif args.mode == "grad_bytes":
        micro = [collate(rows, DOCS, pad_id=0) for rows in STEPS[0][rank * per_rank:(rank + 1) * per_rank]]
        engine.forward_backward(micro[0], 1e-3, last_micro=False)
        out["grad_bytes_after_first_micro"] = local_grad_bytes(engine)
        out["full_param_bytes_in_reduce_dtype"] = sum(p.numel() * 4 for p in engine.module.parameters())
        out["local_param_bytes"] = sum((p.to_local() if hasattr(p, "to_local") else p).untyped_storage().nbytes()
                                       for p in engine.module.parameters())
    elif args.mode == "dtypes":
        out.update(measure_dtypes(engine, rank, per_rank))
    elif args.mode == "recompute":
        out["layer_calls"] = count_layer_calls(engine, collate(STEPS[0][0], DOCS, pad_id=0))
    out["world"] = world
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(out))
    del engine  # its device mesh holds the process group: free it before the group is destroyed
    D.shutdown()


def count_layer_calls(engine, mb) -> list[int]:
    """Calls of each decoder layer's MLP during one forward_backward: 1 without checkpointing, 2 with it.
    (The MLP, not the layer: transformers checkpoints the layer's forward, so the layer's own hooks run once.)"""
    layers = [m.mlp for m in engine.module.modules() if type(m).__name__.endswith("DecoderLayer")]
    calls = [0] * len(layers)

    def counter(i):
        def hook(module, args, kwargs=None):
            calls[i] += 1
        return hook

    handles = [layer.register_forward_pre_hook(counter(i)) for i, layer in enumerate(layers)]
    engine.forward_backward(mb, 1e-3, last_micro=True)
    for h in handles:
        h.remove()
    return calls


def measure_dtypes(engine, rank, per_rank) -> dict:
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    frozen = [p for p in engine.module.parameters() if not p.requires_grad]
    compute = set()
    hooks = [m.register_forward_hook(lambda m, i, o: compute.add(str(o.dtype)))
             for m in engine.module.modules() if isinstance(m, torch.nn.Linear)]
    micro = [collate(rows, DOCS, pad_id=0) for rows in STEPS[0][rank * per_rank:(rank + 1) * per_rank]]
    watched = _watched_matrix(engine)
    before = watched().clone()
    accumulate_gradients(engine, micro)
    for h in hooks:
        h.remove()
    grads = sorted({str(p.grad.dtype) for p in trained if p.grad is not None} | _zero3_grad_dtypes(engine))
    engine.clip_and_step()
    after = watched()
    changed = (after != before).float().mean().item()
    opt_state = sorted({str(v.dtype) for st in _optimizer_states(engine) for k, v in st.items()
                        if torch.is_tensor(v) and v.dim() > 0})
    return {"params": sorted({str(p.dtype) for p in trained}), "frozen": sorted({str(p.dtype) for p in frozen}),
            "master": sorted(_master_dtypes(engine)), "grads": grads, "optimizer_state": opt_state,
            "compute": sorted(compute), "changed_fraction": changed}


def _watched_matrix(engine):
    """The master copy of one trained weight matrix (this rank's shard / partition)."""
    if hasattr(engine, "ds"):
        flat = engine.ds.optimizer.fp32_partitioned_groups_flat[0]
        return lambda: flat.detach().float()
    # LoRA's A matrices get no gradient on the first step (B starts at zero): watch a B matrix.
    p = next(p for n, p in engine.module.named_parameters()
             if p.requires_grad and p.dim() == 2 and "embed" not in n and "lora_A" not in n)
    return lambda: (p.to_local() if hasattr(p, "to_local") else p).detach().float()


def _master_dtypes(engine) -> set:
    if hasattr(engine, "ds"):
        return {str(t.dtype) for t in engine.ds.optimizer.fp32_partitioned_groups_flat}
    return {str(p.dtype) for p in engine.module.parameters() if p.requires_grad}


def _zero3_grad_dtypes(engine) -> set:
    if not hasattr(engine, "ds"):
        return set()
    opt = engine.ds.optimizer
    parts = getattr(opt, "_DeepSpeedZeroOptimizer_Stage3__param_grad_partitions", None) or []
    return {str(g.dtype) for g in parts if g is not None} | {str(opt.grad_partitions_flat_buffer.dtype)} \
        if hasattr(opt, "grad_partitions_flat_buffer") else set()


def _optimizer_states(engine):
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
    return list(inner.state.values())


if __name__ == "__main__":
    main()
