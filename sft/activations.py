"""Activation memory of one micro-batch: the tensors autograd saves for backward, per decoder layer.

Counted per token for the transformers Llama-family decoder layer (Llama, Mistral, Qwen2: RMSNorm,
rotary attention with grouped KV heads, SiLU-gated MLP), `b` = bytes of the compute dtype:

- each RMSNorm saves its input upcast to fp32 (4h; the input itself when it is fp32), the normalised
  value in the compute dtype (bh) and its output (bh, saved by the projections that read it);
- attention saves what the backend keeps: flash-attn its q, k, v (k, v with the KV heads only),
  output and fp32 log-sum-exp; sdpa with a packing mask the same with k, v repeated to all heads,
  plus the mask the kernel converts per call (T_row^2 per row) and a copy of the output for o_proj;
  eager the fp32 softmax and its compute-dtype copy (heads x T_row per token: the T^2 scores);
- the MLP saves the gate and up projections, the SiLU output and their product (4 x bf).
Measured against autograd's saved tensors on CPU in tests/test_plan.py (sdpa and eager, fp32 and bf16).

With per-layer activation checkpointing only each layer's input (bh per token) stays for backward;
the backward of one layer recomputes that layer's activations (the "recompute window").
"""

from __future__ import annotations

from dataclasses import dataclass

LSE_BYTES = 4  # log-sum-exp per (token, head), fp32


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @classmethod
    def of(cls, hf_config) -> "Shapes":
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(hf_config.hidden_size, hf_config.intermediate_size, heads,
                   getattr(hf_config, "num_key_value_heads", None) or heads, head_dim, hf_config.num_hidden_layers)


def norm_bytes(s: Shapes, b: int) -> int:
    """Per token: fp32 input (4h), normalised value (bh), output (bh)."""
    return 4 * s.hidden + 2 * b * s.hidden


def attention_bytes(s: Shapes, b: int, backend: str, row_tokens: int, masked: bool) -> int:
    """Per token, what the attention block saves (after the q/k/v projections' shared input)."""
    q = b * s.heads * s.head_dim
    kv = b * s.kv_heads * s.head_dim
    if backend.startswith("flash"):
        # q, k, v copies the kernel makes contiguous, its output (o_proj reads a view of it), log-sum-exp
        return q + 2 * kv + q + LSE_BYTES * s.heads
    if backend == "eager":
        scores = 4 * s.heads * row_tokens + (b * s.heads * row_tokens if b != 4 else 0)
        return q + 2 * q + scores + q  # q, repeated k and v, softmax (+ its cast), output copy for o_proj
    # sdpa: with a mask transformers repeats k/v to all heads (no GQA kernel with masks); without, it passes GQA
    keys = 2 * q if masked else 2 * kv
    mask = b * row_tokens if masked else 0  # the float mask each call converts, T_row^2 per row
    return q + keys + q + LSE_BYTES * s.heads + q + mask


def mlp_bytes(s: Shapes, b: int) -> int:
    return 4 * b * s.intermediate


def layer_bytes_per_token(s: Shapes, b: int, backend: str, row_tokens: int, masked: bool, lora_rank: int = 0,
                          lora_modules: int = 0) -> int:
    lora = lora_modules * lora_rank * b  # each adapter's A output (its input is the projection's, shared)
    return 2 * norm_bytes(s, b) + attention_bytes(s, b, backend, row_tokens, masked) + mlp_bytes(s, b) + lora


@dataclass
class Activations:
    saved: int  # held from the end of the forward into the backward (all layers, final norm, loss inputs)
    window: int  # transient during one layer's backward (recomputed activations with checkpointing + gradients)
    per_layer: int  # one layer's saved activations without checkpointing
    checkpointed: bool

    @property
    def peak(self) -> int:
        return self.saved + self.window


def estimate(hf_config, *, compute_bytes: int, backend: str, rows: int, row_tokens: int, checkpointing: bool,
             packed: bool, lora_rank: int = 0, lora_modules: int = 0) -> Activations:
    """Activations of one micro-batch of `rows` rows of `row_tokens` tokens."""
    s = Shapes.of(hf_config)
    b = compute_bytes
    tokens = rows * row_tokens
    masked = packed and backend == "sdpa"
    per_layer = tokens * layer_bytes_per_token(s, b, backend, row_tokens, masked, lora_rank, lora_modules)
    # After the last layer: the final norm's fp32 input and normalised value, and the target positions' hidden
    # states the checkpointed loss chunks keep as inputs (every token a target at worst). The norm's output
    # itself is only index-selected, which saves no copy of it.
    tail = tokens * norm_bytes(s, b)
    # Backward of one layer holds gradients of its largest intermediates: the MLP's (2 x f) and the stream's (2 x h).
    grads = tokens * b * (2 * s.intermediate + 2 * s.hidden)
    if checkpointing:
        # Each layer keeps its input (the mask and rotary tables are rebuilt, not saved).
        saved = s.layers * tokens * b * s.hidden + tail
        return Activations(saved, per_layer + grads, per_layer, True)
    return Activations(s.layers * per_layer + tail, grads, per_layer, False)
