"""Small models and Trainer-format checkpoints for the inference / evaluation / export tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=48", "data.seq_length=16",
        "model.max_position_embeddings=64", "latent.tau=0.3", "latent.max_steps=3"]


def reference_model(overrides: list[str], vocab: int, seed: int = 7,
                    dtype: torch.dtype = torch.float32):
    """A single-process LoadedModel, initialised like the Trainer would (seeded)."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.inference.loading import build_model
    from megatron_latentcot.model.llama import init_weights

    cfg = load_config(None, TINY + overrides)
    model = build_model(cfg, vocab)
    init_weights(model.stage, cfg.model, seed)
    model.stage.to(dtype)
    return model


def save_world_of_one(out: Path, overrides: list[str], vocab: int, tokenizer=None,
                      seed: int = 7) -> Path:
    """A Trainer-format checkpoint (per-rank file + manifest) written by one process."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.inference.loading import world_of_one
    from megatron_latentcot.model.llama import LlamaStage, init_weights
    from megatron_latentcot.training import checkpoint as ckpt

    cfg = load_config(None, TINY + overrides)
    ctx = world_of_one()
    model = LlamaStage(cfg, ctx, vocab)
    init_weights(model, cfg.model, seed)
    manifest = {"config": cfg.to_dict()}
    if tokenizer is not None:
        manifest["tokenizer"] = tokenizer.fingerprint
    return ckpt.save_checkpoint(out, 5, {"model": model.state_dict()}, manifest, ctx, 1)


def decoded_flops_equal_forward(model, toks: torch.Tensor) -> float:
    """Assert a decoder's FLOPs, for the whole prompt at once and one token per call, equal the
    teacher-forced forward's over the same tokens; return that count."""
    from megatron_latentcot.inference.decoder import IncrementalDecoder, training_forward

    tf = training_forward(model.scheduler, toks)
    expected = model.scheduler.forward_flops(tf.output)
    dec = IncrementalDecoder(model.stage, model.cfg)
    dec.reset(toks.shape[0])
    assert dec.extend(list(toks)).flops == expected
    dec.reset(toks.shape[0])
    calls = [dec.extend([row[t:t + 1] for row in toks]) for t in range(toks.shape[1])]
    assert sum(c.flops for c in calls) == expected
    return expected
