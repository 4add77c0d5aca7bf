"""The checks of bench/gpu_check.py. Each takes the Context and returns report rows (see gpu_check.row).

Every check goes through the project's own code: sft.parallel.build_engine builds the model and its
engine from the same plain dataclasses a Hydra run fills (EngineSpec), sft.loader.collate makes the
micro-batches, sft.loss.ChunkedLossLM computes the loss, sft.flops the MFU, sft.export final/.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import gpu_check_setup as S
from gpu_check_setup import row

IGNORE = -100


@dataclass
class Context:
    scale: S.Scale
    device: torch.device
    work: Path
    out: Path | None = None  # where a profile of a training step goes, beside the report
    peaks: dict = field(default_factory=dict)  # setting -> (EngineSpec, measured peak bytes), for the plan check
    _tok: object = None
    _peak_flops: tuple | None = None
    _checkpoint: str | None = None

    @property
    def tok(self):
        if self._tok is None:
            self._tok = S.tokenizer()
        return self._tok

    @property
    def checkpoint(self) -> str:
        """The check's model as a local checkpoint (model.path), written on first use."""
        if self._checkpoint is None:
            self._checkpoint = S.write_checkpoint(self.scale, self.tok, self.device, self.work / "init_checkpoint")
        return self._checkpoint

    @property
    def peak_flops(self) -> tuple[float, str]:
        if self._peak_flops is None:
            self._peak_flops = S.peak_flops(self.device, self.scale.compute_dtype)
        return self._peak_flops

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def plan_of_checks(ctx: Context) -> list:
    """(name, budget in seconds, function) in the order they run: correctness first, then speed, then the rest."""
    b = ctx.scale.budgets
    out = [("packed_vs_unpacked", b["packed_vs_unpacked"], packed_vs_unpacked)]
    for backend in ("sdpa", "flex_attention", "flash_attention_2"):
        budget = b["probe_flex"] if backend == "flex_attention" else b["probe"]
        out.append((f"probe.{backend}", budget, functools.partial(probe, backend=backend)))
    for strategy, method in (("single", "full"), ("fsdp", "full"), ("single", "lora"), ("fsdp", "lora")):
        out.append((f"{strategy}_{method}", b["train"], functools.partial(train_throughput, strategy=strategy, method=method)))
    out.append(("plan", b["plan"], plan_vs_measured))
    out.append(("curve_export", b["curve_export"], curve_and_export))
    return out


# ---------------------------------------------------------------- how a run of the GPU recipe is specified

def spec(ctx: Context, strategy: str, method: str = "full", attn: str = "sdpa", steps: int = 10, lr: float = 1e-4,
         accumulation: int = 1, checkpointing: bool = True):
    """The GPU recipe (conf/experiment/llama3_70b_full.yaml, llama3_8b_lora_large.yaml) for this scale:
    weights loaded in the compute dtype, fp32 master weights, gradients and AdamW state, bf16 compute
    (FSDP2's all-gather dtype, autocast on a single GPU), fp32 gradient reduction; the same on the toy model."""
    from sft.model import PeftConfig
    from sft.optim import OptimConfig
    from sft.parallel import EngineSpec, ParallelConfig

    s = ctx.scale
    par = ParallelConfig(strategy=strategy, param_dtype=s.dtype_name, reduce_dtype="float32", master_dtype="float32")
    peft = PeftConfig(method="lora", r=s.lora_r, alpha=2 * s.lora_r) if method == "lora" else PeftConfig(method="none")
    optim = OptimConfig(lr=lr, warmup_steps=min(3, steps), schedule="constant", grad_clip=1.0)
    model = S.model_config(s, attn=attn, checkpointing=checkpointing, path=ctx.checkpoint)
    return EngineSpec(model=model, peft=peft, parallel=par, optim=optim,
                      loss_chunk_mb=s.loss_chunk_mb, total_steps=steps, world=1, micro_rows=1, accumulation=accumulation)


def build(ctx: Context, sp):
    from sft.parallel import build_engine, needs_process_group

    if needs_process_group(sp.parallel):
        S.init_single_process_group(ctx.device)
    return build_engine(sp, ctx.tok, ctx.device)


def train_step(engine, micro: list) -> tuple[torch.Tensor, int, int, int]:
    """One optimizer step exactly as sft.train takes it (sft.step), then the update; the loss stays on the
    device until the caller reads it. One process here, so this rank's loss sum is the step's."""
    from sft.step import accumulate_gradients

    totals = accumulate_gradients(engine, micro)
    engine.clip_and_step()
    loss = totals.local_loss_sum / max(totals.targets, 1.0)
    return loss, int(totals.tokens), int(totals.targets), int(totals.attention_pairs)


def _peak_bytes(ctx: Context) -> int:
    if ctx.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(ctx.device))
    return _rss_anon_bytes()


def _rss_anon_bytes() -> int:
    """CPU stand-in: anonymous resident memory now (peak RSS would count mapped files and never reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)


GiB = 2**30


# ---------------------------------------------------------------- 1. packed == unpacked

def _doc_spans(lengths, packed: bool) -> list[tuple[int, int, int]]:
    spans, t = [], 0
    for i, n in enumerate(lengths):
        spans.append((0, t, t + n) if packed else (i, 0, n))
        t += n
    return spans


def _inputs(mb, dev, labels=None) -> dict:
    from sft.parallel import to_device

    out = to_device(mb, dev)
    if labels is not None:  # a per-document selection of the targets
        from sft.loader import MicroBatch

        out = to_device(MicroBatch(mb.input_ids, mb.position_ids, labels, mb.num_tokens, int((labels != IGNORE).sum()),
                                   mb.attn_kwargs), dev)
    return out


def _doc_losses(module, mb, spans, dev) -> list[float]:
    """Mean loss of each document, through ChunkedLossLM with only that document's targets kept."""
    out = []
    with torch.no_grad():
        for r, a, b in spans:
            lab = torch.full_like(mb.labels, IGNORE)
            lab[r, a:b] = mb.labels[r, a:b]
            n = int((lab != IGNORE).sum())
            out.append(float(module(**_inputs(mb, dev, lab))) / n)
    return out


def _grads(module, mb, dev) -> dict:
    module.zero_grad(set_to_none=True)
    module(**_inputs(mb, dev)).backward()
    out = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def _cosine(a: dict, b: dict) -> tuple[float, str, float]:
    """Cosine of the whole gradients (accumulated per tensor in fp64), and the worst single tensor's."""
    dot = na = nb = 0.0
    worst, worst_cos = "", 1.0
    for k in a:
        x, y = a[k].double().flatten(), b[k].double().flatten()
        d, xx, yy = float(x @ y), float(x @ x), float(y @ y)
        dot, na, nb = dot + d, na + xx, nb + yy
        c = d / math.sqrt(xx * yy) if xx > 0 and yy > 0 else (1.0 if xx == yy else 0.0)
        if c < worst_cos:
            worst, worst_cos = k, c
    return dot / math.sqrt(na * nb), worst, worst_cos


def packed_vs_unpacked(ctx: Context) -> list[dict]:
    """Four documents packed in one row vs one per (padded) row: the same per-document loss and gradients.

    fp32 is held tight: isolation is exact there, so only summation order differs. In bf16 the packed
    and the unpacked calls are two different roundings of the same function (sdpa even picks different
    kernels for a masked and a causal call), so bf16 is held to the error bf16 itself makes on this
    input, measured against fp32: packed vs unpacked may differ by at most 4x that (twice the error of
    each side, and a factor 2 of margin), with a floor of one bf16 rounding (2^-9 relative) on the loss.
    A leak control (the same row with positions running on across documents, so later documents see
    earlier ones) shows how large a real isolation failure is next to those tolerances.
    """
    from sft.loader import collate
    from sft.loss import ChunkedLossLM

    s, dev = ctx.scale, ctx.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    docs = S.random_docs(s.doc_lengths, s.arch["vocab_size"], seed=7, target_fraction=0.6)
    n = len(s.doc_lengths)
    pad = ctx.tok.pad_token_id
    packed = collate([list(range(n))], docs, pad)
    unpacked = collate([[i] for i in range(n)], docs, pad)
    leak = collate([list(range(n))], docs, pad)
    leak.position_ids = torch.arange(leak.input_ids.shape[1])[None]  # one long "document": no isolation
    sp_packed, sp_unpacked = _doc_spans(s.doc_lengths, True), _doc_spans(s.doc_lengths, False)

    from sft.parallel import build_loss_module

    # Per-layer checkpointing as in training: if sdpa falls back to its math kernel for fp32 with a mask, each
    # layer's attention weights (heads x T^2 x 4 bytes, 2 GB at 4k tokens) then never pile up over 16 layers.
    ref_spec = spec(ctx, "single", checkpointing=True)
    ref_spec.model.dtype = "float32"
    ref = build_loss_module(ref_spec, ctx.tok, dev)  # fp32 weights, built on the device
    ref.train()
    loss32 = (_doc_losses(ref, packed, sp_packed, dev), _doc_losses(ref, unpacked, sp_unpacked, dev))
    loss_leak = _doc_losses(ref, leak, sp_packed, dev)
    g32p = _grads(ref, packed, dev)
    g32u = _grads(ref, unpacked, dev)
    cos32, worst32, wcos32 = _cosine(g32p, g32u)
    del g32u
    rel32 = max(abs(p - u) / abs(u) for p, u in zip(*loss32))
    leak_rel = max(abs(p - u) / abs(u) for p, u in zip(loss_leak, loss32[1]))
    tol32_loss, tol32_cos = 1e-5, 1e-6
    rows = [
        row("packed_vs_unpacked.loss_fp32", rel32 <= tol32_loss, rel32, "rel diff",
            f"max over {n} documents of |packed-unpacked|/unpacked, tolerance {tol32_loss:g}; losses "
            f"{', '.join(f'{x:.5f}' for x in loss32[1])}; a leak would change them by up to {leak_rel:.2g}"),
        row("packed_vs_unpacked.grad_fp32", 1 - cos32 <= tol32_cos, 1 - cos32, "1-cosine",
            f"whole-gradient cosine {cos32:.12f}, tolerance 1-cos <= {tol32_cos:g}; worst tensor {worst32} ({wcos32:.9f})"),
    ]
    # The same weights in bf16, the dtype the GPU recipe computes in: the checkpoint holds bf16 values, so this
    # copy is exact and only the arithmetic differs. Buffers (rotary frequencies) stay fp32, as in a model loaded in bf16.
    low = ChunkedLossLM(ref.model, ref.chunk_size)
    for p in low.parameters():
        p.data = p.data.to(torch.bfloat16)
    del ref
    loss16 = (_doc_losses(low, packed, sp_packed, dev), _doc_losses(low, unpacked, sp_unpacked, dev))
    g16p = _grads(low, packed, dev)
    cos_ref, _, _ = _cosine(g16p, g32p)  # what bf16 alone does to the gradient
    del g32p
    g16u = _grads(low, unpacked, dev)
    cos16, worst16, wcos16 = _cosine(g16p, g16u)
    del g16p, g16u, low
    err16 = max(abs(a - b) / abs(b) for a, b in zip(loss16[1], loss32[1]))
    rel16 = max(abs(p - u) / abs(u) for p, u in zip(*loss16))
    tol16_loss = max(4 * err16, 2.0**-9)
    tol16_cos = max(4 * (1 - cos_ref), 1e-6)
    rows += [
        row("packed_vs_unpacked.loss_bf16", rel16 <= tol16_loss, rel16, "rel diff",
            f"tolerance {tol16_loss:.2g} = max(4 x bf16-vs-fp32 error {err16:.2g}, 2^-9)"),
        row("packed_vs_unpacked.grad_bf16", 1 - cos16 <= tol16_cos, 1 - cos16, "1-cosine",
            f"tolerance {tol16_cos:.2g} = 4 x (1 - cosine of bf16 vs fp32 gradients {cos_ref:.9f}); "
            f"worst tensor {worst16} ({wcos16:.6f})"),
    ]
    return rows


# ---------------------------------------------------------------- 2. the start-up isolation probe

def probe(ctx: Context, backend: str) -> list[dict]:
    """sft.loss.check_document_isolation exactly as sft.train calls it, on an engine built for `backend`."""
    from sft.loss import check_document_isolation
    from sft.model import VARLEN_BACKENDS

    name = f"probe.{backend}"
    if backend in VARLEN_BACKENDS:
        if ctx.device.type != "cuda":
            return [row(name, None, None, "", "skipped: flash attention needs a CUDA GPU")]
        try:
            import flash_attn  # noqa: F401
        except ImportError as exc:
            return [row(name, None, None, "", f"skipped: flash_attn is not importable ({exc})")]
    engine = build(ctx, spec(ctx, "single", attn=backend, steps=1))
    t = time.monotonic()
    numeric = engine.precision.compute == torch.float32
    try:
        with engine.compute_context():
            diff = check_document_isolation(engine.module, len(ctx.tok), ctx.device, varlen=backend in VARLEN_BACKENDS,
                                            numeric=numeric)
    except Exception as exc:
        from sft.errors import SFTError

        if isinstance(exc, SFTError) or ctx.device.type == "cuda":
            raise
        # flex_attention on CPU: forward-only and compiled; a torch without CPU support is a skip here, not a failure.
        return [row(name, None, None, "", f"skipped on CPU: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")]
    how = ("numeric packed==alone within 1e-4 and bitwise isolation" if numeric else
           f"bitwise isolation and causality in {ctx.scale.dtype_name} (the numeric check is fp32-only)")
    return [row(name, True, diff, "max|dlogit|", f"{how}; {time.monotonic() - t:.1f} s incl. compilation")]


# ---------------------------------------------------------------- 3. speed and memory

def _training_rows(ctx: Context, scale: S.Scale, rows_per_step: int, steps: int, seed: int):
    from sft.packing import build_rows

    need = rows_per_step * steps * scale.max_length
    lengths = S.synthetic_lengths(scale, int(need * 1.15), seed)
    docs = S.random_docs(lengths, scale.arch["vocab_size"], seed=seed, target_fraction=0.6)
    rows = build_rows(docs.lengths, "bfd", scale.max_length)
    rows.sort(key=lambda r: -int(docs.lengths[r].sum()))  # the fullest rows: the speed of full 4k rows
    if len(rows) < rows_per_step * steps:
        raise RuntimeError(f"only {len(rows)} packed rows for {rows_per_step * steps}")
    return docs, rows


def train_throughput(ctx: Context, strategy: str, method: str) -> list[dict]:
    """tokens/s, MFU and peak memory of the GPU recipe with per-layer activation checkpointing at max_length."""
    from sft.flops import mfu, model_flops
    from sft.loader import collate

    s, dev = ctx.scale, ctx.device
    name = f"{strategy}_{method}"
    accumulation = 2
    steps = s.warmup_steps + s.timed_steps
    docs, rows = _training_rows(ctx, s, accumulation, steps, seed=11)
    sp = spec(ctx, strategy, method, steps=steps, accumulation=accumulation, lr=2e-4 if method == "lora" else 1e-5)
    _reset_peak(ctx)
    engine = build(ctx, sp)
    flops = model_flops(engine.module)
    pad = ctx.tok.pad_token_id
    batches = [[collate([rows[(k * accumulation + i)]], docs, pad) for i in range(accumulation)] for k in range(steps)]
    losses, tokens, pairs, seconds = [], 0, 0, 0.0
    for k, micro in enumerate(batches):
        if k == s.warmup_steps:
            ctx.sync()
            t = time.perf_counter()
        loss, tok, _, pr = train_step(engine, micro)
        losses.append(loss)
        if k >= s.warmup_steps:
            tokens += tok
            pairs += pr
    ctx.sync()
    seconds = time.perf_counter() - t
    peak = _peak_bytes(ctx)
    if method == "full" and ctx.out is not None:
        _profile_step(ctx, engine, batches[-1], name)
    losses = [float(x) for x in losses]
    finite = all(math.isfinite(x) for x in losses)
    tps = tokens / seconds
    util = mfu(flops.step_flops(tokens, pairs), seconds, 1, ctx.peak_flops[0])
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    ctx.peaks[name] = (sp, peak)
    del engine
    recipe = (f"{s.timed_steps} steps x {accumulation} rows of <= {s.max_length} tokens after {s.warmup_steps} warm-up; "
              f"master fp32, compute {s.dtype_name}, checkpointing per layer; {trainable / 1e6:.1f}M trained")
    floor = 0.10 if dev.type == "cuda" else 0.0
    mem_total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    return [
        row(f"{name}.tokens_per_s", finite and tps > 0, round(tps, 1), "tokens/s",
            f"{recipe}; losses {losses[0]:.3f} -> {losses[-1]:.3f}" + ("" if finite else " (NOT FINITE)")),
        row(f"{name}.mfu", finite and util > floor, round(util, 4), "fraction",
            f"sft.flops model FLOPs / ({ctx.peak_flops[1]}: {ctx.peak_flops[0] / 1e12:.3g} TFLOP/s)"
            + (f"; floor {floor:.0%} catches fp32 compute or host-bound steps, it is not a target" if floor else "")),
        row(f"{name}.peak_memory", peak > 0 and (mem_total is None or peak < 0.95 * mem_total), round(peak / GiB, 3), "GiB",
            "torch.cuda.max_memory_allocated from before the model was built" if dev.type == "cuda"
            else "CPU: anonymous resident memory of the whole process at the end (not a peak; no CUDA counter here)"),
    ]


def _profile_step(ctx: Context, engine, micro: list, name: str) -> None:
    """One more step under torch.profiler: where a step's device time goes (matmuls, attention, loss, optimizer)
    and how much of the wall time the device was busy, written to profile_<name>.txt for reading, not judged."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = ctx.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    ctx.sync()
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        train_step(engine, micro)
        ctx.sync()
    wall = time.perf_counter() - t
    key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    # The table ends with "Self CUDA time total": the device's busy time, to set against the wall time here.
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    (ctx.out / f"profile_{name}.txt").write_text(
        f"{name}: one step of {len(micro)} micro-batches, wall {wall:.3f} s (profiler on)\n\n{table}\n")


# ---------------------------------------------------------------- 4. peak memory against sft-plan

def plan_vs_measured(ctx: Context) -> list[dict]:
    """sft-plan's per-GPU prediction (sft.memory.plan_memory) for the settings the training checks measured.

    torch.cuda.max_memory_allocated counts the caching allocator's live tensors only, so it is compared
    with the plan's allocator part: its peak less the CUDA-context and NCCL allowances and the
    fragmentation margin, which that counter cannot see.
    """
    predict, why = _plan_predictor(ctx)
    if predict is None:
        return [row("plan.peak_memory", None, None, "", f"skipped: no plan ({why})")]
    rows = []
    on_gpu = ctx.device.type == "cuda"
    for name, (sp, measured) in ctx.peaks.items():
        predicted, total = predict(sp)
        ok = measured <= 1.10 * predicted and predicted <= 2.0 * measured
        detail = (f"measured {measured / GiB:.3f} GiB (max_memory_allocated) vs the plan's allocator peak "
                  f"{predicted / GiB:.3f} GiB (whole-GPU peak {total / GiB:.2f} GiB); pass if measured <= 1.1 x predicted "
                  f"(no surprise OOM) and predicted <= 2 x measured")
        if not on_gpu:
            detail = f"skipped: no peak-memory counter on CPU (predicted {predicted / GiB:.3f} GiB, process now {measured / GiB:.3f} GiB)"
        rows.append(row(f"plan.{name}", ok if on_gpu else None, round(predicted / GiB, 3), "GiB predicted", detail))
    return rows or [row("plan.peak_memory", None, None, "", "skipped: no training check measured a peak")]


def _plan_predictor(ctx: Context):
    """(callable EngineSpec -> (predicted allocator bytes, predicted whole-GPU bytes), "") or (None, why not)."""
    try:
        from sft.memory import CUDA_CONTEXT_BYTES, FRAGMENTATION, NCCL_BYTES, plan_memory
    except ModuleNotFoundError as exc:
        if exc.name != "sft.memory":  # the plan is there but needs a package this machine lacks: a real failure
            raise
        return None, "no sft/memory.py in this checkout"
    from types import SimpleNamespace

    capacity = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.device.type == "cuda" else 80 * GiB

    def predict(sp):
        # The run config's sections plan_memory reads, filled from the same dataclasses the engine was built from.
        cfg = SimpleNamespace(model=sp.model, peft=sp.peft, parallelism=sp.parallel, optim=sp.optim,
                              train=SimpleNamespace(micro_batch_size=sp.micro_rows, loss_chunk_mb=sp.loss_chunk_mb),
                              data=SimpleNamespace(max_length=ctx.scale.max_length), packing=SimpleNamespace(strategy="bfd"))
        plan = plan_memory(cfg, sp.world, capacity, accumulation=sp.accumulation)
        allocator = (plan.peak - CUDA_CONTEXT_BYTES - (NCCL_BYTES if sp.world > 1 else 0)) / (1 + FRAGMENTATION)
        return allocator, plan.peak

    return predict, ""


# ---------------------------------------------------------------- 5. a loss curve, export, generation

def curve_and_export(ctx: Context) -> list[dict]:
    """20 optimizer steps of the FSDP2 recipe on the demo conversations, then final/ through sft.export."""
    from transformers import AutoModelForCausalLM

    from sft.export import export_final
    from sft.loader import collate
    from sft.packing import build_rows, plan_epoch
    from sft.templating import resolve_eot_id

    s, dev = ctx.scale, ctx.device
    eot = resolve_eot_id(ctx.tok, None)
    docs = S.demo_docs(ctx.tok, eot, s.max_length, s.curve_steps * s.curve_rows * s.max_length)
    rows = build_rows(docs.lengths, "bfd", s.max_length)
    per_epoch = len(rows) // s.curve_rows  # whole steps only: a padded last step would train fewer rows
    if per_epoch < 1:
        raise RuntimeError(f"{len(rows)} packed rows of demo conversations for steps of {s.curve_rows} rows")
    sp = spec(ctx, "fsdp", steps=s.curve_steps, lr=s.curve_lr, accumulation=s.curve_rows)
    engine = build(ctx, sp)
    pad = ctx.tok.pad_token_id
    losses, t = [], time.monotonic()
    for step in range(s.curve_steps):
        epoch, index = divmod(step, per_epoch)
        plan = plan_epoch(rows, docs.lengths, 0, epoch, s.curve_rows, 1)
        micro = [collate(r, docs, pad) for r in plan.micro_batches(index, 0, 1)]
        losses.append(train_step(engine, micro)[0])
    losses = [float(x) for x in losses]
    train_s = time.monotonic() - t
    first, last = losses[0], float(np.mean(losses[-5:]))
    falls = all(math.isfinite(x) for x in losses) and last < 0.8 * first and last < float(np.mean(losses[:5]))
    rows_out = [row("curve.loss_falls", falls, round(last, 4), "nats",
                    f"{s.curve_steps} steps of {s.curve_rows} rows (FSDP2 recipe, lr {s.curve_lr:g}) on the demo conversations: "
                    f"first {first:.3f}, mean of last 5 {last:.3f} (must be < 0.8 x first); "
                    f"curve {' '.join(f'{x:.2f}' for x in losses)}; {train_s:.1f} s")]

    t = time.monotonic()
    run_dir = ctx.work / "run"
    final = export_final(engine, ctx.tok, run_dir, eot)
    export_s = time.monotonic() - t
    size = sum(f.stat().st_size for f in final.iterdir())
    loaded = AutoModelForCausalLM.from_pretrained(str(final))
    got = loaded.state_dict()
    worst, missing = 0.0, []
    for key, want in engine.iter_full_tensors():
        if key not in got:
            missing.append(key)
            continue
        worst = max(worst, float((got[key].float() - want.float()).abs().max()))
    del engine
    equal = worst == 0.0 and not missing
    rows_out.append(row("export.weights_equal", equal, worst, "max|dw|",
                        f"final/ ({size / 2**30:.2f} GiB, {', '.join(sorted(p.name for p in final.iterdir())[:4])}, ...) "
                        f"loaded by from_pretrained vs the engine's full tensors; export {export_s:.1f} s"
                        + (f"; missing {missing[:3]}" if missing else "")))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(final))
    prompt = tok.apply_chat_template([{"role": "user", "content": "color: cherry"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    model = loaded.to(dev, dtype=s.compute_dtype).eval()
    new = 8
    with torch.no_grad():
        out = model.generate(**{k: v.to(dev) for k, v in prompt.items()}, max_new_tokens=new, do_sample=False)
    gen = out[0, prompt["input_ids"].shape[1]:]
    text = tok.decode(gen.tolist(), skip_special_tokens=False)
    eos = loaded.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    stopped = 0 < len(gen) < new and int(gen[-1]) in eos
    ok = len(gen) == new or stopped
    rows_out.append(row("export.generate", ok, len(gen), "tokens",
                        f"greedy from final/ in {s.dtype_name} for 'color: cherry' (demo answer: red): {text!r}"
                        + (" (stopped at end of turn)" if stopped else "")))
    return rows_out
