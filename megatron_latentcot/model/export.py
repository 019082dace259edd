"""Full (unsharded) logical weights of a single-process model, and the HF Llama mapping."""

from __future__ import annotations

import torch
from torch import nn

from megatron_latentcot.config import ModelConfig
from megatron_latentcot.model.llama import logical_parameters


@torch.no_grad()
def logical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-style names -> full tensors. Needs TP = 1 (each rank's slice is then the whole)."""
    out = {}
    for name, lp in logical_parameters(model):
        if tuple(lp.local.shape) != lp.shape:
            raise ValueError(f"{name} is tensor-parallel sharded; gather it before exporting")
        out[name] = lp.local.detach().clone()
    return out


def to_hf_llama(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our logical names -> transformers' ``LlamaForCausalLM`` state dict (router dropped)."""
    hf = {}
    for name, t in state.items():
        if name.startswith("router."):
            continue
        hf[name if name.startswith("lm_head.") else f"model.{name}"] = t[:vocab_size] \
            if name in ("embed_tokens.weight", "lm_head.weight") else t
    return hf


def hf_llama_config(m: ModelConfig, vocab_size: int):
    """The transformers ``LlamaConfig`` for our model config (embedding_multiplier must be 1)."""
    from transformers import LlamaConfig

    if (m.embedding_multiplier or 0) != 1.0:
        raise ValueError("HF Llama has no embedding multiplier: export needs "
                         "model.embedding_multiplier = 1.0")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, mlp_bias=False, head_dim=m.head_dim)
