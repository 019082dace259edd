"""Recurrent baselines on the same stage pieces as the latent scheduler (../shared/METHOD.md).

- ``looped``: the whole layer stack applied K times to the full sequence with shared weights;
  causal attention within each repeat, no K/V across repeats, final norm once.
- ``pondering`` (PonderLM): K passes; pass j+1's input at t is the scaled token embedding plus
  the expected scaled embedding under pass j's next-token distribution; final pass predicts.
- ``pause``: K-1 learnable pause embeddings after every token (sequence x K, positions
  0..TK-1); the prediction for token t's target is read at its last pause slot.
- ``ponderlm2`` (PonderLM-2, docs/baselines_ponderlm2_mor.md 1): K stages per token, stage i+1's
  input the final-norm output of stage i, interleaved into one K-times longer sequence with
  every stage at the token's RoPE position t, plain causal over it (so stage 0 of token t sees
  every stage of earlier tokens). Training solves that recurrence across positions with Jacobi
  passes, all with gradient; decoding runs it exactly, token by token.

Each is a step generator like ``LatentStepScheduler.steps``, over a
:class:`~megatron_latentcot.model.latent.Feed` (a training micro-batch, or a decoder call over
the K/V of earlier positions: looped and pondering keep one stream per repeat / pass, pause
one, ponderlm2 one). Each returns (LM loss, the final logits when asked for, the plan of every run).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import torch

from megatron_latentcot.flops import ponderlm2_passes
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


def ponderlm2(stage: LlamaStage, feed: Feed, stages: int,
              jacobi: int) -> Generator[LayerRun, torch.Tensor, Result]:
    """``stages`` = K = 1 + latent thoughts. Training (the authors' procedure): passes over the
    first p stages (:func:`~megatron_latentcot.flops.ponderlm2_passes`: p = 1..K-1, then K for
    ``jacobi`` Jacobi passes and the final pass), each a fresh causal pass over the interleaved
    [e, z^(1)..z^(p-1)] (slot t*p + i of a row), after which z^(i+1) := final-norm output at the
    stage-i slots; logits from the final pass's last stage. Decoding: :func:`_ponderlm2_decode`."""
    if feed.decoding:
        return (yield from _ponderlm2_decode(stage, feed, stages))
    e = stage.embed(feed.ids)  # [N, 1, H], N = rows * seq
    n, h_dim = e.shape[0], e.shape[-1]
    seq, doc = feed.seq, feed.mb.get("doc_ids")
    latents: list[torch.Tensor] = []  # z^(1), ..., z^(p-1): the next pass's latent inputs
    passes = ponderlm2_passes(stages, jacobi)
    plans = []
    for i, p in enumerate(passes):
        x = torch.stack([e, *(z.to(e.dtype) for z in latents[:p - 1])], dim=1).reshape(
            n * p, 1, h_dim)
        long_seq = seq * p
        slots = torch.arange(n * p, device=e.device)
        plan = feed.plan(stage, slots, long_seq,
                         doc=None if doc is None else doc.repeat_interleave(p, dim=1))
        plans.append(plan)
        h = yield LayerRun(x, slots, (slots % long_seq) // p, plan, past=False)
        z = stage.final_norm(h).view(n, p, 1, h_dim)
        if i == len(passes) - 1:
            return (*feed.head(stage, z[:, -1]), plans)
        latents = list(z[:, :stages - 1].unbind(1))


def _ponderlm2_decode(stage: LlamaStage, feed: Feed,
                      stages: int) -> Generator[LayerRun, torch.Tensor, Result]:
    """The exact recurrence over the decoder's cache: the new tokens in waves (the w-th new
    token of every row), each token's K stages one run after another at its position t. Every
    cached key is then an earlier token's stage or an earlier stage of the same token, all
    visible, so each run attends to the whole stream (its step filter set to K)."""
    new, seq = feed.slots, feed.seq
    rows_of = new // seq
    counts = torch.bincount(rows_of, minlength=feed.rows)
    rank = torch.arange(new.numel(), device=new.device) - (torch.cumsum(counts, 0) - counts)[rows_of]
    e = stage.embed(feed.ids)
    stream = feed.stream(0)
    z_last = torch.empty_like(e)
    plans = []
    for wave in range(int(rank.max()) + 1 if new.numel() else 0):
        index = (rank == wave).nonzero().squeeze(1)
        q_slots, x = new[index], e[index]
        for i in range(stages):
            plan = feed.plan(stage, q_slots, seq, step=stages)
            plans.append(plan)
            x = stage.final_norm((yield feed.run(x.to(e.dtype), q_slots, seq, plan, stream,
                                                 i + 1)))
        z_last[index] = x.to(e.dtype)
    return (*feed.head(stage, z_last), plans)
