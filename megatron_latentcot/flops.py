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


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
