"""Recurrent baselines on the same stage pieces as the latent scheduler (../shared/METHOD.md).

- ``looped``: the whole layer stack applied K times to the full sequence with shared weights;
  causal attention within each repeat, no K/V across repeats, final norm once.
- ``pondering`` (PonderLM): K passes; pass j+1's input at t is the scaled token embedding plus
  the expected scaled embedding under pass j's next-token distribution; final pass predicts.
- ``pause``: K-1 learnable pause embeddings after every token (sequence x K, positions
  0..TK-1); the prediction for token t's target is read at its last pause slot.

Each is a step generator like ``LatentStepScheduler.steps``, over a
:class:`~megatron_latentcot.model.latent.Feed` (a training micro-batch, or a decoder call over
the K/V of earlier positions: looped and pondering keep one stream per repeat / pass, pause
one). Each returns (LM loss, the final logits when asked for, the plan of every run).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import torch

from megatron_latentcot.loss import vocab_parallel_softmax
from megatron_latentcot.model.attention import AttentionPlan
from megatron_latentcot.model.llama import LayerRun, LlamaStage

if TYPE_CHECKING:
    from megatron_latentcot.model.latent import Feed

Result = tuple[torch.Tensor, torch.Tensor | None, list[AttentionPlan]]


def looped(stage: LlamaStage, feed: Feed, repeats: int) -> Generator[LayerRun, torch.Tensor, Result]:
    """Each repeat is one layer run, so the pipeline can send the last stage's output back to
    the first (training: the first run's input None is the token embedding)."""
    slots, seq = feed.slots, feed.seq
    plan = feed.plan(stage, slots, seq, doc=feed.mb.get("doc_ids"))
    h = feed.token_input(stage)
    for j in range(repeats):
        h = yield feed.run(h, slots, seq, plan, feed.stream(j))
    return (*feed.head(stage, stage.final_norm(h)), [plan] * repeats)


def pondering(stage: LlamaStage, feed: Feed, passes: int) -> Generator[LayerRun, torch.Tensor, Result]:
    slots, seq = feed.slots, feed.seq
    plan = feed.plan(stage, slots, seq, doc=feed.mb.get("doc_ids"))
    e = stage.embed(feed.ids)
    h = yield feed.run(e, slots, seq, plan, feed.stream(0))
    for j in range(1, passes):
        probs = vocab_parallel_softmax(stage.logits(stage.final_norm(h)))
        h = yield feed.run(e + stage.embed_distribution(probs.to(e.dtype)), slots, seq, plan,
                           feed.stream(j))
    return (*feed.head(stage, stage.final_norm(h)), [plan] * passes)


def pause(stage: LlamaStage, feed: Feed, slots: int) -> Generator[LayerRun, torch.Tensor, Result]:
    """``slots`` = K: each token followed by K-1 pause embeddings, token t's at grid positions
    tK..tK+K-1 of a K-times longer sequence."""
    e = stage.embed(feed.ids)  # [n, 1, H]
    n, h_dim = e.shape[0], e.shape[-1]
    if slots > 1:
        pauses = stage.pause_vectors(e.dtype)  # [K-1, H]
        e = torch.cat([e, pauses[None].expand(n, -1, -1)], dim=1)  # [n, K, H]
    e = e.reshape(n * slots, 1, h_dim)
    seq, new = feed.seq, feed.slots
    long_seq = seq * slots
    first = (new // seq) * long_seq + (new % seq) * slots  # each token's own slot
    long_slots = (first[:, None] + torch.arange(slots, device=new.device)).reshape(-1)
    doc = feed.mb.get("doc_ids")
    doc = doc.repeat_interleave(slots, dim=1) if doc is not None else None
    plan = feed.plan(stage, long_slots, long_seq, doc=doc)
    h = yield feed.run(e, long_slots, long_seq, plan, feed.stream(0))
    z = stage.final_norm(h).view(n, slots, 1, h_dim)[:, -1]  # last slot of each token
    return (*feed.head(stage, z), [plan])
