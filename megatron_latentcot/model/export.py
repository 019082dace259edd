"""Full (unsharded) logical weights of a single-process model, and the HF Llama mapping."""

from __future__ import annotations

import torch
from torch import nn

from megatron_latentcot.config import ROPE_SCALING_FIELDS, ModelConfig
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


VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")  # logical weights with a row per token
# Our ModelConfig's RoPE-scaling fields <-> the keys of transformers' rope_scaling dict.
HF_ROPE_KEYS = {"rope_scaling_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
                "rope_high_freq_factor": "high_freq_factor",
                "rope_original_max_position_embeddings": "original_max_position_embeddings"}


def hf_name(name: str) -> str:
    """Our logical weight name -> transformers' (``model.`` prefix, except the LM head)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def logical_name(hf: str) -> str:
    """The inverse of :func:`hf_name`."""
    return hf.removeprefix("model.")


def to_hf_llama(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our logical names -> transformers' ``LlamaForCausalLM`` state dict (router dropped;
    vocabulary rows cut to ``vocab_size``, which drops an imported vocabulary's padding)."""
    return {hf_name(name): t[:vocab_size] if name in VOCAB_ROWS else t
            for name, t in state.items() if not name.startswith("router.")}


def hf_llama_config(m: ModelConfig, vocab_size: int):
    """The transformers ``LlamaConfig`` for our model config (embedding_multiplier must be 1)."""
    from transformers import LlamaConfig

    if (m.embedding_multiplier or 0) != 1.0:
        raise ValueError("HF Llama has no embedding multiplier: export needs "
                         "model.embedding_multiplier = 1.0")
    scaling = None if m.rope_scaling is None else {
        "rope_type": m.rope_scaling,
        **{HF_ROPE_KEYS[f]: getattr(m, f) for f in ROPE_SCALING_FIELDS[m.rope_scaling]}}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, rope_scaling=scaling,
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
        head_dim=m.head_dim)


# -- writing exports (single-process logical weights) ------------------------------------------

def fold_embedding_multiplier(state: dict[str, torch.Tensor], multiplier: float,
                              tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """Scale the embedding rows by ``multiplier`` so a model without one computes the same.

    Untied embeddings only: tied ones also serve as the LM head, which must stay unscaled.
    """
    if multiplier == 1.0:
        return dict(state)
    if tie_embeddings:
        raise ValueError("tied embeddings with an embedding multiplier != 1 cannot be exported "
                         "to a model without one (the LM head shares the weight)")
    out = dict(state)
    out["embed_tokens.weight"] = state["embed_tokens.weight"] * multiplier
    return out


def save_hf_llama(state: dict[str, torch.Tensor], m: ModelConfig, vocab_size: int, out_dir,
                  embedding_multiplier: float, eod: int | None = None,
                  dtype: torch.dtype | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` that ``LlamaForCausalLM.from_pretrained`` loads.

    ``state``: logical weights (:func:`logical_state_dict`); the router, if any, is dropped; the
    embedding multiplier is folded into untied embeddings; an imported model's vocabulary
    padding (rows from ``model.predicted_vocab_size`` on) is cut, so import -> export gives back
    the original tensors.
    """
    import dataclasses
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folded = fold_embedding_multiplier(state, embedding_multiplier, m.tie_embeddings)
    vocab_size = m.predicted_vocab_size or vocab_size
    hf = to_hf_llama(folded, vocab_size)
    if m.tie_embeddings:
        hf.pop("lm_head.weight", None)
    hf = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in hf.items()}
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_llama_config(dataclasses.replace(m, embedding_multiplier=1.0), vocab_size)
    if eod is not None:
        config.eos_token_id = config.bos_token_id = eod
    config.torch_dtype = str(dtype or next(iter(hf.values())).dtype).replace("torch.", "")
    config.save_pretrained(str(out))


def save_latent_export(state: dict[str, torch.Tensor], model_cfg: dict, latent_cfg: dict,
                       vocab_size: int, out_dir, seq_length: int,
                       tokenizer: dict | None = None, extra: dict | None = None,
                       dtype: torch.dtype | None = None) -> None:
    """Write logical weights (``model.safetensors``) + ``latent_config.json`` for our inference code.

    ``model_cfg`` / ``latent_cfg``: the ``model`` and ``latent`` config sections as dicts;
    ``tokenizer``: ``Tokenizer.export``'s record, {"type", "file" (relative to ``out_dir``; "."
    for the directory itself, e.g. GPT-2's vocab.json + merges.txt), "fingerprint", ...}.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "megatron-latentcot"})
    meta = {"format": "megatron-latentcot", "version": 1, "model": model_cfg,
            "latent": latent_cfg, "vocab_size": vocab_size, "seq_length": seq_length,
            "tokenizer": tokenizer, **(extra or {})}
    (out / "latent_config.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
