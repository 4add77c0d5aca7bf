"""What the GPU acceptance check runs on: the model from config values, the data, the device facts.

Everything here works with only torch, transformers, peft, accelerate and numpy installed (what the
lent GPU machines have): no Hydra, omegaconf, datasets or deepspeed. The project's dataclasses
(ModelConfig, ...) are plain dataclasses, so they are filled here directly instead of composed.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "sft" / "assets" / "tiny_tokenizer"
DEMO_DATA = REPO / "sft" / "assets" / "demo" / "conversations.jsonl"

# Llama 3.2 1B's config.json values (1.24B parameters, tied embeddings): the Llama-3 shape (128k
# vocabulary, grouped-query attention with 8 KV heads, rope theta 5e5) at a size whose full
# fine-tuning state (fp32 weights, gradients and AdamW moments: 16 bytes x 1.24B = 20 GB) leaves
# most of one H100 for activations.
LLAMA3_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
# The same shape (GQA, tied embeddings) small enough for a CPU rehearsal in seconds.
TOY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)

# Dense bf16 peak per GPU from the vendors' data sheets (no sparsity), the denominator of MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclass
class Scale:
    """Sizes of one rehearsal: the real thing on a GPU, a toy one on CPU (--tiny)."""

    tiny: bool
    arch: dict
    compute_dtype: torch.dtype  # what the matrix multiplies run in
    max_length: int  # tokens per packed row
    doc_lengths: tuple  # documents of the packed == unpacked check (sum <= max_length)
    min_doc: int  # synthetic training documents: lengths log-uniform in [min_doc, max_doc]
    max_doc: int
    warmup_steps: int  # training steps not timed (allocator, kernels' autotuning, compilation)
    timed_steps: int
    curve_steps: int = 20
    curve_rows: int = 1  # packed rows per optimizer step of the loss curve
    curve_lr: float = 3e-4  # a pretraining-size step: the model starts from random weights
    lora_r: int = 16
    # Bytes of one output-layer chunk (train.loss_chunk_mb): the 70B recipe's 1024 MB (~700 tokens at 128k vocab).
    loss_chunk_mb: float = 1024.0
    budgets: dict = field(default_factory=dict)  # seconds per check
    total_budget_s: float = 480.0  # what the whole run should take
    hard_stop_s: float = 540.0  # the runner stops here, whatever is running

    @property
    def dtype_name(self) -> str:
        return {torch.float32: "float32", torch.bfloat16: "bfloat16"}[self.compute_dtype]


def gpu_scale() -> Scale:
    return Scale(
        tiny=False, arch=dict(LLAMA3_1B), compute_dtype=torch.bfloat16, max_length=4096,
        doc_lengths=(1536, 931, 1024, 487), min_doc=128, max_doc=3072, warmup_steps=3, timed_steps=8,
        curve_rows=2,
        # Seconds each check may take: 2-3x what it should need on an H100 (the model loads from a local
        # checkpoint in seconds; flex_attention compiles once). flash_attention_2 is skipped without flash-attn.
        budgets={"packed_vs_unpacked": 60, "probe": 45, "probe_flex": 100, "train": 60, "plan": 20, "curve_export": 120},
    )


def tiny_scale() -> Scale:
    return Scale(
        # The GPU recipe's precision (bf16 weights loaded, fp32 master, bf16 compute) on CPU too, so the rehearsal
        # takes the same code paths (autocast, FSDP2 casts, mixed-dtype LoRA) that the GPU run will.
        tiny=True, arch=dict(TOY), compute_dtype=torch.bfloat16, max_length=128,
        doc_lengths=(50, 31, 27, 17), min_doc=8, max_doc=96, warmup_steps=1, timed_steps=2, curve_rows=2,
        # 64-token output-layer chunks (12 bytes per vocabulary entry: sft.loss), so a row takes several.
        lora_r=4, loss_chunk_mb=64 * 12 * TOY["vocab_size"] / 2**20, curve_lr=3e-3,
        # About 30 s of CPU time (15 s with inductor's cache warm: flex_attention compiles C++ on CPU), but CI
        # machines are shared: on 2 cores under a load of 10 that compilation took 85 s of wall time.
        budgets={"packed_vs_unpacked": 60, "probe": 60, "probe_flex": 180, "train": 60, "plan": 30, "curve_export": 90},
        total_budget_s=120.0, hard_stop_s=330.0,
    )


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def peak_flops(dev: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The MFU denominator and where it came from. Unknown devices (CPUs) get a measured matmul rate."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_BF16_FLOPS[key], f"{name} data-sheet dense bf16 peak"
    return _measured_matmul_flops(dev, dtype), "measured square matmul rate of this device (no data-sheet peak)"


def _measured_matmul_flops(dev: torch.device, dtype: torch.dtype) -> float:
    import time

    n = 512 if dev.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    reps = 5
    _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_facts(dev: torch.device) -> dict:
    facts = {"type": dev.type, "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        facts.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 2), multiprocessors=p.multi_processor_count,
                     capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda, driver=_driver_version())
    else:
        facts["name"] = platform.processor() or platform.machine()
    return facts


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:  # noqa: BLE001 - a missing nvidia-smi only loses one fact
        return None


def versions() -> dict:
    import importlib

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy", "flash_attn"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - absent packages are recorded as absent
            out[name] = None
    return out


def row(name: str, ok, value, unit: str, detail: str = "") -> dict:
    """One line of the report. ok: True (PASS), False (FAIL) or None (SKIP, with the reason in detail).
    A non-finite value (a diverged loss) becomes null with the value in the detail: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        value, detail, ok = None, f"value {value}; {detail}", (False if ok is not None else None)
    return {"name": name, "pass": ok, "value": value, "unit": unit, "detail": detail}


# ---------------------------------------------------------------- model and tokenizer

def tokenizer():
    from transformers import AutoTokenizer

    # The shipped tiny tokenizer: no hub access, and its ids are a subset of any vocabulary here.
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def model_config(scale: Scale, dtype: torch.dtype | None = None, attn: str = "sdpa", checkpointing: bool = False,
                 path: str | None = None):
    """The run's `model` section. With `path`, the model loads from that checkpoint, as a real run's does."""
    from sft.model import ModelConfig

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype or scale.compute_dtype]
    return ModelConfig(name="gpu_check_1b" if not scale.tiny else "gpu_check_toy", path=path, tokenizer=str(TOKENIZER),
                       model_type="llama", arch=dict(scale.arch), dtype=name, attn_implementation=attn,
                       activation_checkpointing=checkpointing, init_seed=0)


def write_checkpoint(scale: Scale, tok, dev: torch.device, out: Path) -> str:
    """The model built from config values once (random weights, on the device: fast), saved as a Hugging Face
    checkpoint that every check then loads. Random initialisation on the host takes ~10-25 s per build of
    1.2B parameters (one thread draws the numbers); reading the checkpoint takes a few seconds."""
    from sft.model import build_model

    model = build_model(model_config(scale), tok, dev)
    model.save_pretrained(str(out))  # safetensors: the only format transformers 5 writes
    del model
    return str(out)


# ---------------------------------------------------------------- data

class DocSplit:
    """Documents in memory, shaped like sft.data.Split for the loader's collate: example(i) -> (ids, labels)."""

    def __init__(self, ids: list[np.ndarray], labels: list[np.ndarray]):
        self.ids, self.labels = ids, labels
        self.lengths = np.asarray([len(x) for x in ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def example(self, i: int):
        return self.ids[i], self.labels[i]


def random_docs(lengths, vocab: int, seed: int, target_fraction: float = 1.0) -> DocSplit:
    """Random tokens; the trailing `target_fraction` of each document is trained (a prompt, then an answer)."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths:
        x = rng.integers(3, vocab, size=int(n), dtype=np.int64)
        y = x.copy()
        y[: int(n * (1 - target_fraction))] = -100
        ids.append(x)
        labels.append(y)
    return DocSplit(ids, labels)


def synthetic_lengths(scale: Scale, total_tokens: int, seed: int) -> np.ndarray:
    """SFT-like document lengths: log-uniform between min_doc and max_doc tokens."""
    rng = np.random.default_rng(seed)
    out, t = [], 0
    while t < total_tokens:
        n = int(np.exp(rng.uniform(np.log(scale.min_doc), np.log(scale.max_doc))))
        out.append(n)
        t += n
    return np.asarray(out, dtype=np.int64)


def demo_docs(tok, eot_id: int, max_length: int, max_tokens: int) -> DocSplit:
    """The bundled demo conversations through the project's reader and chat-template masking, the first
    ones up to `max_tokens`; like data.overlong=drop, conversations longer than a row are left out."""
    from sft.sources import read_source
    from sft.templating import encode_conversation

    ids, labels, total = [], [], 0
    for rec in read_source(str(DEMO_DATA)):
        if total >= max_tokens:
            break
        x, mask = encode_conversation(rec, tok, eot_id, None)
        x = x.astype(np.int64)
        if len(x) > max_length:
            continue
        ids.append(x)
        labels.append(np.where(mask, x, -100))
        total += len(x)
    return DocSplit(ids, labels)


def init_single_process_group(dev: torch.device) -> None:
    """A process group of one (FSDP2 needs a group even alone): the launcher's job, done here."""
    from sft import distributed as D

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.setdefault(key, "0" if key != "WORLD_SIZE" else "1")
    D.init_distributed(timeout_minutes=5, always=True)
