"""Teacher-forced scoring of token sequences with the training forward (batched, any method).

Every evaluation here (perplexity, LAMBADA, lm-evaluation-harness log-likelihoods) reduces to:
for a sequence, the log-probability of each of its tokens from ``first`` on given everything
before it, whether it was the greedy choice, and the passes the model ran at the predicting
position. The training forward computes all positions of a batch at once; by causality a
right-padded row scores exactly like the row alone, and tests/test_generate.py shows the
forward equals step-by-step decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_latentcot.inference.decoder import training_forward


@dataclass
class Window:
    """Score ``tokens[first:]``, each given ``tokens[:j]`` (``first`` >= 1)."""

    tokens: list[int]
    first: int


@dataclass
class Scored:
    nll: np.ndarray  # [n] -log p(token) in nats, for tokens[first:]
    greedy: np.ndarray  # [n] bool: the token was the argmax
    steps: np.ndarray  # [n] passes run at the position that predicted it


@torch.no_grad()
def score_windows(model, windows: Sequence[Window], batch_size: int = 8,
                  max_batch_tokens: int | None = None) -> list[Scored]:
    """Score every window with ``model`` (a LoadedModel), longest first, in batches."""
    scheduler, device = model.scheduler, model.device
    for w in windows:
        if not 1 <= w.first <= len(w.tokens):
            raise ValueError(f"window of {len(w.tokens)} tokens cannot score from {w.first}")
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
    out: list[Scored | None] = [None] * len(windows)
    i = 0
    while i < len(order):
        width = len(windows[order[i]].tokens) - 1
        size = batch_size
        if max_batch_tokens:
            size = max(1, min(size, max_batch_tokens // max(width, 1)))
        group = order[i:i + size]
        i += len(group)
        if width == 0:
            for j in group:
                out[j] = Scored(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))
            continue
        batch = torch.zeros(len(group), width, dtype=torch.long)
        for r, j in enumerate(group):
            ids = windows[j].tokens[:-1]
            batch[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        tf = training_forward(scheduler, batch.to(device))
        logp = torch.log_softmax(tf.logits.double(), dim=-1)
        greedy = tf.logits.argmax(dim=-1)
        for r, j in enumerate(group):
            w = windows[j]
            pos = torch.arange(w.first - 1, len(w.tokens) - 1, device=device)
            target = torch.tensor(w.tokens[w.first:], dtype=torch.long, device=device)
            out[j] = Scored(nll=(-logp[r, pos, target]).cpu().numpy(),
                            greedy=(greedy[r, pos] == target).cpu().numpy(),
                            steps=tf.steps[r, pos].cpu().numpy())
    return out  # type: ignore[return-value]
