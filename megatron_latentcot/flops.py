"""Analytic FLOPs (multiply-add = 2 FLOPs), from the token slots actually processed.

Training = 3 x forward (backward costs two forward-sized matmuls per matmul). Attention is
counted from the exact number of visible (query, key) pairs, not a causal constant.
"""

from __future__ import annotations

from megatron_latentcot.config import ModelConfig

# Dense bf16 peak TFLOP/s per device, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def layer_matmul_flops_per_token(m: ModelConfig) -> int:
    d, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim
    return 2 * (d * (q + 2 * kv) + q * d + 3 * d * m.ffn_hidden_size)


def attention_flops(m: ModelConfig, visible_pairs: int) -> int:
    """Scores and weighted sum over ``visible_pairs`` (query, key) pairs, one layer."""
    return 4 * m.num_attention_heads * m.head_dim * visible_pairs


def causal_pairs(rows: int, seq: int) -> int:
    return rows * seq * (seq + 1) // 2


def forward_flops(m: ModelConfig, vocab: int, token_slots: int, visible_pairs: int,
                  head_tokens: int) -> int:
    """One forward: ``token_slots`` through every layer, ``head_tokens`` through the LM head."""
    per_layer = layer_matmul_flops_per_token(m) * token_slots + attention_flops(m, visible_pairs)
    return m.num_layers * per_layer + 2 * m.hidden_size * vocab * head_tokens


def vanilla_train_flops(m: ModelConfig, vocab: int, rows: int, seq: int) -> int:
    tokens = rows * seq
    return 3 * forward_flops(m, vocab, tokens, causal_pairs(rows, seq), tokens)


def latent_forward_flops(m: ModelConfig, vocab: int, step_tokens: list[int],
                         step_pairs: list[int], head_tokens: int, router_tokens: int = 0) -> int:
    """One forward of a latent-loop micro-batch from its per-step counts.

    ``step_tokens[k]`` slots ran step k+1 with ``step_pairs[k]`` visible attention pairs; the
    LM head ran on ``head_tokens`` (z^f); the router (one output) on ``router_tokens``.
    """
    layers = sum(m.num_layers * (layer_matmul_flops_per_token(m) * n + attention_flops(m, p))
                 for n, p in zip(step_tokens, step_pairs))
    return layers + 2 * m.hidden_size * (vocab * head_tokens + router_tokens)


def latent_train_flops(m: ModelConfig, vocab: int, step_tokens: list[int], step_pairs: list[int],
                       head_tokens: int, ptarget_tokens: int = 0, router_tokens: int = 0) -> int:
    """Forward + backward of a latent-loop micro-batch (:func:`latent_forward_flops` x 3) plus
    the per-step p_target head, which runs forward only, without gradient, on
    ``ptarget_tokens``."""
    forward = latent_forward_flops(m, vocab, step_tokens, step_pairs, head_tokens, router_tokens)
    return 3 * forward + 2 * m.hidden_size * vocab * ptarget_tokens


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
