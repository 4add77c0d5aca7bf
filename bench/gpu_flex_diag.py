"""Why flex_attention let packed documents see each other on the first GPU (bench/gpu_check.py, probe.flex_attention).

    python bench/gpu_flex_diag.py --out DIR          # on a GPU, ~1 minute; --device cpu for the rehearsal

Three layers, each tested alone, so the failing one is named:
  torch        torch's flex_attention with a document mask_mod against sdpa with the same dense mask
  mask         the mask transformers builds for a packed row (position_ids restarting at 0, no attention_mask):
               whether it found the documents, and whether a query of the second document may see the first
  model        sft.loss.check_document_isolation on a tiny Llama, in fp32 and bf16, eval and train mode
  autocast     the same with fp32 weights under torch.autocast(bf16), the single-GPU recipe (--autocast-only)
Writes flex_diag.json. Reads nothing from the network.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def torch_layer(dev, dtype) -> dict:
    """flex_attention with a document mask_mod vs sdpa with the equivalent boolean mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    lengths = [9, 6, 40]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(dev)
    t = doc.numel()

    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    q, k, v = (torch.randn(1, 4, t, 32, device=dev, dtype=dtype) for _ in range(3))
    dense = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[None, None])
    out = {}
    for compiled in (False, True):
        try:
            block = create_block_mask(mask_mod, 1, None, t, t, device=dev, _compile=compiled)
            fn = torch.compile(flex_attention) if compiled else flex_attention
            got = fn(q, k, v, block_mask=block)
            out[f"compiled={compiled}"] = float((got - ref).abs().max())
        except Exception as exc:  # noqa: BLE001 - the diagnosis reports, never stops
            out[f"compiled={compiled}"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


SHAPES = {  # head_dim 16 (the CPU tests' shape), head_dim 64, and bench/gpu_check.py's 1.2B shape cut to 2 layers
    "hd16": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "hd64": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),
    "gpu_check_2l": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8),
}


def tiny_model(attn: str, dev, dtype, shape: str = "hd16"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=300, num_hidden_layers=2, max_position_embeddings=256, **SHAPES[shape])
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).to(dev)
    m.config.use_cache = False
    return m


def mask_layer(dev, dtype) -> dict:
    """What transformers hands the attention function for a packed row of a 9- and a 6-token document."""
    import transformers.masking_utils as mu
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = {}
    original_find = mu.find_packed_sequence_indices

    def find(position_ids, *a, **k):
        r = original_find(position_ids, *a, **k)
        seen["packed_indices"] = None if r is None else r.tolist()
        return r

    original_attn = ALL_ATTENTION_FUNCTIONS["flex_attention"]

    def attn(module, query, key, value, attention_mask, *a, **k):
        if "mask_type" not in seen:
            seen["mask_type"] = type(attention_mask).__name__
            if hasattr(attention_mask, "mask_mod"):
                z = torch.tensor(0, device=dev)
                ask = lambda q, kv: bool(attention_mask.mask_mod(z, z, torch.tensor(q, device=dev), torch.tensor(kv, device=dev)))  # noqa: E731
                seen["second_doc_sees_first (q=10,kv=2)"] = ask(10, 2)
                seen["within_doc (q=10,kv=9)"] = ask(10, 9)
                seen["block_mask_shape"] = list(attention_mask.shape) if hasattr(attention_mask, "shape") else None
                try:
                    dense = attention_mask.to_dense()
                    seen["to_dense_sum"] = int(dense.sum())
                except Exception as exc:  # noqa: BLE001
                    seen["to_dense"] = f"{type(exc).__name__}: {exc}"[:200]
        return original_attn(module, query, key, value, attention_mask, *a, **k)

    mu.find_packed_sequence_indices = find
    ALL_ATTENTION_FUNCTIONS["flex_attention"] = attn
    try:
        m = tiny_model("flex_attention", dev, dtype).eval()
        ids = torch.randint(3, 300, (1, 15), device=dev)
        pos = torch.cat([torch.arange(9), torch.arange(6)])[None].to(dev)
        with torch.no_grad():
            m(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        mu.find_packed_sequence_indices = original_find
        ALL_ATTENTION_FUNCTIONS["flex_attention"] = original_attn
    return seen


def model_layer(dev, dtype) -> dict:
    from sft.loss import ChunkedLossLM, check_document_isolation

    out = {}
    for shape in SHAPES:
        for attn in ("sdpa", "flex_attention"):
            for mode in ("eval", "train") if shape == "hd16" else ("eval",):
                m = tiny_model(attn, dev, dtype, shape)
                m.train(mode == "train")
                try:
                    diff = check_document_isolation(ChunkedLossLM(m, 64), 300, dev, numeric=dtype == torch.float32)
                    out[f"{shape}/{attn}/{mode}"] = f"isolated (packed vs alone {diff:.2g})"
                except Exception as exc:  # noqa: BLE001
                    out[f"{shape}/{attn}/{mode}"] = f"{type(exc).__name__}: {exc}"[:160]
    return out


def autocast_layer(dev, _dtype=None) -> dict:
    """fp32 weights under torch.autocast(bf16): the single-GPU recipe (master fp32, compute bf16), as the probe runs it."""
    from sft.loss import ChunkedLossLM, check_document_isolation

    out = {}
    for shape in ("hd16", "gpu_check_2l"):
        for attn in ("sdpa", "flex_attention"):
            m = tiny_model(attn, dev, torch.float32, shape)
            try:
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    check_document_isolation(ChunkedLossLM(m, 64), 300, dev, numeric=False)
                out[f"{shape}/{attn}/autocast"] = "isolated"
            except Exception as exc:  # noqa: BLE001
                out[f"{shape}/{attn}/autocast"] = f"{type(exc).__name__}: {exc}"[:160]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--autocast-only", action="store_true", help="only the autocast layer (the probe's setting)")
    args = ap.parse_args()
    import transformers

    dev = torch.device(args.device)
    doc = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(dev)}
    if args.autocast_only:
        doc["autocast"] = autocast_layer(dev)
        print(f"autocast: {doc['autocast']}", flush=True)
    for dtype in () if args.autocast_only else (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for layer, fn in (("torch", torch_layer), ("mask", mask_layer), ("model", model_layer)):
            try:
                doc[f"{layer}/{name}"] = fn(dev, dtype)
            except Exception:  # noqa: BLE001
                doc[f"{layer}/{name}"] = traceback.format_exc()[-800:]
            print(f"{layer}/{name}: {doc[f'{layer}/{name}']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flex_diag.json").write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
