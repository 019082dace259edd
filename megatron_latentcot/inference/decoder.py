"""Incremental (KV-cached) forward of every method on one process, and the training forward's
per-token logits for comparison.

:class:`IncrementalDecoder` appends new tokens to a batch of rows of different lengths. Rows
are packed (no padding): token ``t`` of row ``r`` is the slot ``(r, t)``. Every K/V the layers
computed stays in a cache tagged with its (row, position, step), so a query (t, k) attends to
every executed (t', k') of its row with t' <= t and k' <= k, exactly the training rule
(../shared/METHOD.md), including the K/V of tokens that halted early. Per method:

- ``vanilla`` / ``adaptive`` / ``latent_fixed``: the latent loop per new token. Step 1 embeds
  the token, step k+1 feeds ``z^(k)`` back at the same RoPE position; the Router's reach rule
  (continue iff ``p_reach^(k+1) > tau`` and ``k < K_max``) halts it; ``z^f`` mixes the steps by
  their exit probabilities and one LM-head call gives the logits.
- ``looped``: one cache per repeat (causal within a repeat, no K/V across repeats).
- ``pondering``: one cache per pass; pass j+1's input is the token embedding plus the expected
  embedding under pass j's next-token distribution.
- ``pause``: each token occupies K slots (token + K-1 pause embeddings, positions tK..tK+K-1) of
  one causal cache; the prediction is read at the last slot.

Feeding a whole sequence at once (prefill) or one token at a time gives the same logits and the
same halting decisions as the training forward (tests/test_generate.py, float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_latentcot.config import Config
from megatron_latentcot.flops import attention_flops, layer_matmul_flops_per_token
from megatron_latentcot.loss import vocab_parallel_softmax
from megatron_latentcot.model.attention import latent_plan, visible_pairs
from megatron_latentcot.model.latent import LatentOutput, LatentStepScheduler
from megatron_latentcot.model.llama import LlamaStage, upcast
from megatron_latentcot.model.router import Decision, decide

LATENT_METHODS = ("vanilla", "adaptive", "latent_fixed")


@dataclass
class KVCache:
    """Per-layer keys/values of every executed slot, with each slot's (row, position, step)."""

    layers: list | None = None  # per layer (keys [N, Hkv, D], values [N, Hkv, D])
    rows: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    step: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.rows is None else int(self.rows.numel())

    def tags(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.rows is None:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty, empty
        return self.rows, self.pos, self.step


@dataclass
class ExtendOutput:
    """What :meth:`IncrementalDecoder.extend` computed for the new tokens (row-major order)."""

    logits: torch.Tensor  # [n, V] next-token logits at each new token
    steps: torch.Tensor  # [n] passes run at each new token (latent steps incl. the token pass)
    rows: torch.Tensor  # [n] row of each new token
    positions: torch.Tensor  # [n] its position in the row
    flops: int = 0  # forward FLOPs of this call (layers, attention, heads, router)
    step_tokens: list[int] = field(default_factory=list)  # latent methods: tokens run per step


class IncrementalDecoder:
    """KV-cached incremental forward of ``stage`` under ``cfg.latent`` (TP = PP = 1)."""

    def __init__(self, stage: LlamaStage, cfg: Config):
        if stage.tp_size != 1 or not (stage.pre_process and stage.post_process):
            raise ValueError("incremental decoding runs on a single-process model (TP = PP = 1)")
        self.stage, self.cfg = stage, cfg
        lat = cfg.latent
        self.method = lat.method
        self.max_steps = 1 if lat.method == "vanilla" else lat.max_steps
        # K = 1 of any method is the plain token pass (as in the training forward).
        self.kind = "latent" if self.max_steps == 1 or lat.method in LATENT_METHODS else lat.method
        self.tau = lat.tau
        m = cfg.model
        self._layer_flops = m.num_layers * layer_matmul_flops_per_token(m)
        self._head_flops = 2 * m.hidden_size * stage.vocab_size
        self.reset(0)

    @property
    def streams(self) -> int:
        """Independent caches: one per repeat (looped) or pass (pondering), else one."""
        return self.max_steps if self.kind in ("looped", "pondering") else 1

    def reset(self, rows: int) -> None:
        """Forget everything; start ``rows`` empty rows."""
        self.rows = rows
        self.device = next(self.stage.parameters()).device
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.caches = [KVCache() for _ in range(self.streams)]

    # -- one layer-stack call over a cache ------------------------------------------------
    def _run(self, cache: KVCache, h: torch.Tensor, q_rows: torch.Tensor, q_pos: torch.Tensor,
             step: int) -> tuple[torch.Tensor, int]:
        """Run the blocks for queries tagged (q_rows, q_pos, step) over ``cache``; append them.

        Returns the output and this call's FLOPs. Cached keys of steps > ``step`` are hidden.
        """
        c_rows, c_pos, c_step = cache.tags(self.device)
        k_rows, k_pos = torch.cat([c_rows, q_rows]), torch.cat([c_pos, q_pos])
        width = int(torch.cat([k_pos, q_pos]).max().item()) + 1
        live = None
        if bool((c_step > step).any()):
            live = torch.cat([c_step <= step, torch.ones_like(q_rows, dtype=torch.bool)])
        plan = latent_plan(q_rows * width + q_pos, k_rows * width + k_pos, live, self.rows, width,
                           None, "sdpa")
        out, kv = self.stage.run_layers(h, q_pos, plan, past=cache.layers)
        n = int(q_rows.numel())
        cache.layers = kv
        cache.rows, cache.pos = k_rows, k_pos
        cache.step = torch.cat([c_step, torch.full_like(q_rows, step)])
        m = self.cfg.model
        flops = self._layer_flops * n + m.num_layers * attention_flops(m, visible_pairs(plan))
        return out, flops

    def _decide(self, z: torch.Tensor, reach: torch.Tensor,
                k: int) -> tuple[Decision, torch.Tensor | None]:
        return decide(reach, z, k, self.max_steps, self.method,
                      getattr(self.stage, "router", None), self.tau)

    # -- appending tokens -------------------------------------------------------------------
    @torch.no_grad()
    def extend(self, tokens: Sequence[Sequence[int]] | Sequence[torch.Tensor]) -> ExtendOutput:
        """Append ``tokens[r]`` (possibly empty) to row r; returns logits at every new token."""
        if len(tokens) != self.rows:
            raise ValueError(f"expected new tokens for {self.rows} rows, got {len(tokens)}")
        counts = torch.tensor([len(t) for t in tokens], dtype=torch.long, device=self.device)
        ids = torch.cat([torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in tokens]
                        ).to(self.device) if int(counts.sum()) else \
            torch.zeros(0, dtype=torch.long, device=self.device)
        q_rows = torch.repeat_interleave(torch.arange(self.rows, device=self.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        offset = torch.arange(ids.numel(), device=self.device) - starts[q_rows]
        q_pos = self.lengths[q_rows] + offset
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.stage.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.stage.vocab_size})")
        if ids.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return ExtendOutput(torch.zeros(0, self.stage.vocab_size, device=self.device),
                                empty, empty, empty)
        run = {"latent": self._latent, "looped": self._looped, "pondering": self._pondering,
               "pause": self._pause}[self.kind]
        out = run(ids, q_rows, q_pos)
        self.lengths += counts
        return out

    def _latent(self, ids, q_rows, q_pos) -> ExtendOutput:
        stage, cache = self.stage, self.caches[0]
        n = ids.numel()
        h_in = stage.embed(ids)
        active = torch.arange(n, device=self.device)
        work = upcast(h_in).dtype
        reach = torch.ones(n, device=self.device, dtype=work)
        z_final = torch.zeros(n, 1, h_in.shape[-1], device=self.device, dtype=work)
        steps = torch.ones(n, dtype=torch.long, device=self.device)
        flops, step_tokens, routed = 0, [], 0
        for k in range(1, self.max_steps + 1):
            h, f = self._run(cache, h_in, q_rows[active], q_pos[active], k)
            flops += f
            step_tokens.append(int(active.numel()))
            z = stage.final_norm(h)
            decision, gate = self._decide(z, reach, k)
            routed += 0 if gate is None else int(active.numel())
            z_final = z_final.index_add(0, active, decision.exit[:, None, None] * upcast(z))
            cont = decision.cont
            if not bool(cont.any()):
                break
            steps[active[cont]] = k + 1
            active, reach, h_in = active[cont], decision.reach_next[cont], z[cont].to(h.dtype)
        logits = stage.logits(z_final.to(h.dtype)).view(n, -1)
        flops += self._head_flops * n + 2 * self.cfg.model.hidden_size * routed
        return ExtendOutput(logits, steps, q_rows, q_pos, flops, step_tokens)

    def _looped(self, ids, q_rows, q_pos) -> ExtendOutput:
        stage, n = self.stage, ids.numel()
        h, flops = stage.embed(ids), 0
        for cache in self.caches:
            h, f = self._run(cache, h, q_rows, q_pos, 1)
            flops += f
        logits = stage.logits(stage.final_norm(h)).view(n, -1)
        steps = torch.full_like(ids, self.max_steps)
        return ExtendOutput(logits, steps, q_rows, q_pos, flops + self._head_flops * n)

    def _pondering(self, ids, q_rows, q_pos) -> ExtendOutput:
        stage, n = self.stage, ids.numel()
        e = stage.embed(ids)
        h, flops = self._run(self.caches[0], e, q_rows, q_pos, 1)
        for cache in self.caches[1:]:
            probs = vocab_parallel_softmax(stage.logits(stage.final_norm(h)))
            h, f = self._run(cache, e + stage.embed_distribution(probs.to(e.dtype)), q_rows,
                             q_pos, 1)
            flops += f + 2 * self._head_flops * n  # the pass's LM head + expected embedding
        logits = stage.logits(stage.final_norm(h)).view(n, -1)
        steps = torch.full_like(ids, self.max_steps)
        return ExtendOutput(logits, steps, q_rows, q_pos, flops + self._head_flops * n)

    def _pause(self, ids, q_rows, q_pos) -> ExtendOutput:
        stage, n, k = self.stage, ids.numel(), self.max_steps
        e = stage.embed(ids)  # [n, 1, H]
        hidden = e.shape[-1]
        if k > 1:
            pauses = stage.pause_vectors(e.dtype)
            e = torch.cat([e, pauses[None].expand(n, -1, -1)], dim=1)
        e = e.reshape(n * k, 1, hidden)
        slot = torch.arange(k, device=self.device)
        rows = q_rows.repeat_interleave(k)
        pos = (q_pos[:, None] * k + slot[None, :]).reshape(-1)
        h, flops = self._run(self.caches[0], e, rows, pos, 1)
        z = stage.final_norm(h).view(n, k, 1, hidden)[:, -1]
        logits = stage.logits(z).view(n, -1)
        steps = torch.full_like(ids, k)
        return ExtendOutput(logits, steps, q_rows, q_pos, flops + self._head_flops * n)


# -- the training forward's per-token logits ----------------------------------------------

@dataclass
class TeacherForced:
    logits: torch.Tensor  # [B, T, V] the logits the training loss is computed from
    steps: torch.Tensor  # [B, T] passes per token (the training forward's halting decisions)
    output: LatentOutput


def training_forward(scheduler: LatentStepScheduler, tokens: torch.Tensor,
                     labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                     doc_ids: torch.Tensor | None = None, grad: bool = False) -> TeacherForced:
    """Run the training forward (``LatentStepScheduler.forward``) and capture its logits.

    The logits are those of the forward's last LM-head call (on ``z^f``, or on the final pass /
    last pause slot for the baselines), observed by wrapping ``stage.logits``; nothing in the
    forward changes. ``labels`` default to the next token (0 at the end), ``loss_mask`` to ones.
    Runs without autograd unless ``grad``.
    """
    stage = scheduler.stage
    rows, seq = tokens.shape
    if labels is None:
        labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    if loss_mask is None:
        loss_mask = torch.ones(rows, seq, dtype=torch.float32, device=tokens.device)
    mb = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
    if doc_ids is not None:
        mb["doc_ids"] = doc_ids
    seen: list[torch.Tensor] = []
    original = stage.logits

    def logits(z: torch.Tensor) -> torch.Tensor:
        out = original(z)
        seen.append(out)
        return out

    stage.logits = logits  # instance attribute: shadows the method for this call only
    try:
        with torch.set_grad_enabled(grad):
            out = scheduler.forward(mb)
    finally:
        del stage.logits
    final = seen[-1]
    return TeacherForced(final.reshape(rows, seq, -1), out.steps.view(rows, seq), out)
