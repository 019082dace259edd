"""Incremental (KV-cached) forward of every method on one process, and the training forward's
per-token logits for comparison.

:class:`IncrementalDecoder` appends new tokens to a batch of rows of different lengths. Rows
are packed (no padding): token ``t`` of row ``r`` is the slot ``(r, t)``. Each call drives the
method's own step generator (``LatentStepScheduler.steps``, the one training runs) over the new
tokens; its runs attend to the K/V the earlier calls left (:class:`~megatron_latentcot.model.
latent.KVStream`, tagged per (row, position, step)), so a query (t, k) sees every executed
(t', k') of its row with t' <= t and k' <= k, exactly the training rule (../shared/METHOD.md),
including the K/V of tokens that halted early. Looped keeps one stream per repeat, pondering
one per pass, pause one whose token t occupies positions tK..tK+K-1.

Feeding a whole sequence at once (prefill) or one token at a time gives the same logits and the
same halting decisions as the training forward (tests/test_generate.py, float64). FLOPs come
from the generator's step records (``LatentStepScheduler.forward_flops``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_latentcot.config import Config
from megatron_latentcot.model.latent import KVStream, LatentOutput, LatentStepScheduler
from megatron_latentcot.model.llama import LlamaStage


@dataclass
class ExtendOutput:
    """What :meth:`IncrementalDecoder.extend` computed for the new tokens (row-major order)."""

    logits: torch.Tensor  # [n, V] next-token logits at each new token
    steps: torch.Tensor  # [n] passes run at each new token (latent steps incl. the token pass)
    rows: torch.Tensor  # [n] row of each new token
    positions: torch.Tensor  # [n] its position in the row
    flops: float = 0  # forward FLOPs of this call (layers, attention, heads, router)
    step_tokens: list[int] = field(default_factory=list)  # tokens (slots) run by each run


class IncrementalDecoder:
    """KV-cached incremental forward of ``stage`` under ``cfg.latent`` (TP = PP = 1)."""

    def __init__(self, stage: LlamaStage, cfg: Config,
                 scheduler: LatentStepScheduler | None = None):
        if stage.tp_size != 1 or not (stage.pre_process and stage.post_process):
            raise ValueError("incremental decoding runs on a single-process model (TP = PP = 1)")
        self.stage, self.cfg = stage, cfg
        self.scheduler = scheduler or LatentStepScheduler(stage, cfg)
        self.method = cfg.latent.method
        self.max_steps = self.scheduler.max_steps
        self.reset(0)

    @property
    def slots_per_token(self) -> int:
        """Positions one token occupies (pause: K), for the RoPE range check."""
        return self.scheduler.slots_per_token

    def reset(self, rows: int) -> None:
        """Forget everything; start ``rows`` empty rows."""
        self.rows = rows
        self.device = next(self.stage.parameters()).device
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.streams = [KVStream() for _ in range(self.scheduler.streams)]

    @torch.no_grad()
    def extend(self, tokens: Sequence[Sequence[int]] | Sequence[torch.Tensor]) -> ExtendOutput:
        """Append ``tokens[r]`` (possibly empty) to row r; returns logits at every new token."""
        if len(tokens) != self.rows:
            raise ValueError(f"expected new tokens for {self.rows} rows, got {len(tokens)}")
        device = self.device
        counts = torch.tensor([len(t) for t in tokens], dtype=torch.long, device=device)
        if int(counts.sum()) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return ExtendOutput(torch.zeros(0, self.stage.vocab_size, device=device),
                                empty, empty, empty)
        ids = torch.cat([torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in tokens]
                        ).to(device)
        if ids.min() < 0 or ids.max() >= self.stage.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.stage.vocab_size})")
        q_rows = torch.repeat_interleave(torch.arange(self.rows, device=device), counts)
        starts = torch.cumsum(counts, 0) - counts
        q_pos = self.lengths[q_rows] + torch.arange(ids.numel(), device=device) - starts[q_rows]
        # the new tokens in a [rows, width] grid wide enough for every cached position
        width = int((self.lengths + counts).max())
        grid = torch.zeros(self.rows, width, dtype=torch.long, device=device)
        grid[q_rows, q_pos] = ids
        mb = {"tokens": grid, "slots": q_rows * width + q_pos}
        sched = self.scheduler
        out = sched.drive(sched.steps(mb, self.streams, keep_logits=True), mb)
        self.lengths += counts
        return ExtendOutput(out.logits.view(ids.numel(), -1), out.steps, q_rows, q_pos,
                            sched.forward_flops(out), [r.tokens for r in out.records])


# -- the training forward's per-token logits ----------------------------------------------

@dataclass
class TeacherForced:
    logits: torch.Tensor  # [B, T, V] the logits the training loss is computed from
    steps: torch.Tensor  # [B, T] passes per token (the training forward's halting decisions)
    output: LatentOutput


def training_forward(scheduler: LatentStepScheduler, tokens: torch.Tensor,
                     labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                     doc_ids: torch.Tensor | None = None, grad: bool = False) -> TeacherForced:
    """Run the training forward (the method's step generator on one stage) and return its
    logits: those of its last LM-head call (on ``z^f``, or on the final pass / last pause slot
    for the baselines). ``labels`` default to the next token (0 at the end), ``loss_mask`` to
    ones. Runs without autograd unless ``grad``.
    """
    rows, seq = tokens.shape
    if labels is None:
        labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    if loss_mask is None:
        loss_mask = torch.ones(rows, seq, dtype=torch.float32, device=tokens.device)
    mb = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
    if doc_ids is not None:
        mb["doc_ids"] = doc_ids
    with torch.set_grad_enabled(grad):
        out = scheduler.drive(scheduler.steps(mb, keep_logits=True), mb)
    return TeacherForced(out.logits.reshape(rows, seq, -1), out.steps.view(rows, seq), out)
