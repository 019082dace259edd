"""Recurrent baselines on the same stage pieces as the latent scheduler (../shared/METHOD.md).

- ``looped``: the whole layer stack applied K times to the full sequence with shared weights;
  causal attention within each repeat, no K/V across repeats, final norm once.
- ``pondering`` (PonderLM): K passes; pass j+1's input at t is the scaled token embedding plus
  the expected scaled embedding under pass j's next-token distribution; final pass predicts.
- ``pause``: K-1 learnable pause embeddings after every token (sequence x K, positions
  0..TK-1); the prediction for token t's target is read at its last pause slot.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from megatron_latentcot.loss import masked_mean, token_cross_entropy, vocab_parallel_softmax
from megatron_latentcot.model.attention import AttentionPlan, causal_plan
from megatron_latentcot.model.llama import LayerRun, LlamaStage


def _batch(stage: LlamaStage, mb: dict):
    tokens = mb["tokens"]
    rows, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).repeat(rows)
    return tokens, rows, seq, positions, causal_plan(rows, seq, mb.get("doc_ids"),
                                                     stage.attention_backend)


def _lm_loss(stage: LlamaStage, z: torch.Tensor, mb: dict) -> torch.Tensor:
    ce = token_cross_entropy(stage.logits(z), mb["labels"].reshape(-1))
    return masked_mean(ce, mb["loss_mask"].reshape(-1))


# Each returns (LM loss, the attention plan every pass used); ``looped`` as a step generator.

def looped(stage: LlamaStage, mb: dict,
           repeats: int) -> Generator[LayerRun, torch.Tensor, tuple[torch.Tensor, AttentionPlan]]:
    """A step generator (like ``LatentStepScheduler.steps``): each repeat is one layer run, so
    the pipeline can send the last stage's output back to the first."""
    tokens, rows, seq, positions, plan = _batch(stage, mb)
    slots = torch.arange(rows * seq, device=tokens.device)
    h = None  # the first run embeds the tokens
    for _ in range(repeats):
        h = yield LayerRun(h, slots, positions, plan, past=False)
    return _lm_loss(stage, stage.final_norm(h), mb), plan


def pondering(stage: LlamaStage, mb: dict, passes: int):
    tokens, rows, seq, positions, plan = _batch(stage, mb)
    e = stage.embed(tokens.reshape(-1))
    h, _ = stage.run_layers(e, positions, plan)
    for _ in range(passes - 1):
        probs = vocab_parallel_softmax(stage.logits(stage.final_norm(h)))
        h, _ = stage.run_layers(e + stage.embed_distribution(probs.to(e.dtype)), positions, plan)
    return _lm_loss(stage, stage.final_norm(h), mb), plan


def pause(stage: LlamaStage, mb: dict, slots: int):
    """``slots`` = K: each token followed by K-1 pause embeddings."""
    tokens = mb["tokens"]
    rows, seq = tokens.shape
    e = stage.embed(tokens.reshape(-1))  # [B*T, 1, H]
    h_dim = e.shape[-1]
    if slots > 1:
        pauses = stage.pause_vectors(e.dtype)  # [K-1, H]
        e = torch.cat([e, pauses[None].expand(e.shape[0], -1, -1)], dim=1)  # [B*T, K, H]
    e = e.reshape(rows * seq * slots, 1, h_dim)
    long_seq = seq * slots
    positions = torch.arange(long_seq, device=tokens.device).repeat(rows)
    doc = mb.get("doc_ids")
    doc = doc.repeat_interleave(slots, dim=1) if doc is not None else None
    plan = causal_plan(rows, long_seq, doc, stage.attention_backend)
    h, _ = stage.run_layers(e, positions, plan)
    z = stage.final_norm(h).view(rows * seq, slots, 1, h_dim)[:, -1]  # last slot of each token
    return _lm_loss(stage, z, mb), plan
