"""The latent loop across pipeline stages: one latent step is a full pass through every stage.

Units are (micro-batch m, step k), run step-major: every stage does step k of all micro-batches
before step k+1, so while the last stage finishes m's step k the first stage is already on
m+1's. The last stage sends m's survivors (their slots first: the count changes every step)
back to the first stage for step k+1; an empty message means "m is done" and travels once
through the pipeline, so every stage agrees on which units exist. All forward, then all
backward in reverse unit order.

Autograd seams: every (stage, m, k) unit is its own graph segment. Received activations enter
it as leaves, and so do earlier steps' K/V caches; their gradients are handed back to the
producing unit's backward together with its output gradient, so no graph is traversed twice.
On the last stage the method's step generator (``LatentStepScheduler.steps``: router, mixing,
losses) hangs off one leaf per step, so a single loss backward yields every step's output
gradient; the survivors' inputs sent back to stage 0 receive theirs during step k+1's backward.
Gradients only accumulate here: the optimizer reduces them (FSDP2 included) after the last call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_latentcot.model.latent import LatentOutput, LatentStepScheduler
from megatron_latentcot.model.llama import LayerRun
from megatron_latentcot.parallel import ParallelContext


class _Links:
    """Non-blocking sends and blocking receives between this rank's pipeline peers.

    Messages towards a later stage and towards an earlier one travel on two different
    communicators, so NCCL never queues a send behind a receive that is waiting for it.
    """

    def __init__(self, ctx: ParallelContext, hidden: int, dtype: torch.dtype):
        self.ctx, self.hidden, self.dtype = ctx, hidden, dtype
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def _peer(self, stage: int, sending: bool):
        """The peer's global rank and the communicator of the message's direction."""
        towards_later = stage > self.ctx.pp_rank if sending else stage < self.ctx.pp_rank
        return self.ctx.stage_rank(stage), None if towards_later else self.ctx.pp_group

    def _isend(self, t: torch.Tensor, stage: int) -> None:
        dst, group = self._peer(stage, sending=True)
        t = t.contiguous()
        self.pending.append((dist.isend(t, dst, group=group), t))

    def _recv(self, t: torch.Tensor, stage: int) -> torch.Tensor:
        src, group = self._peer(stage, sending=False)
        dist.recv(t, src, group=group)
        return t

    def send_run(self, stage: int, slots: torch.Tensor | None, x: torch.Tensor | None) -> None:
        """(slots, activations) of one unit; ``slots`` None: the micro-batch is done."""
        count = 0 if slots is None else slots.numel()
        self._isend(torch.tensor([count], dtype=torch.int64, device=self.ctx.device), stage)
        if count:
            self._isend(slots, stage)
            self._isend(x.detach().to(self.dtype), stage)

    def recv_run(self, stage: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        device = self.ctx.device
        count = int(self._recv(torch.zeros(1, dtype=torch.int64, device=device), stage).item())
        if count == 0:
            return None, None
        slots = self._recv(torch.empty(count, dtype=torch.int64, device=device), stage)
        x = self._recv(torch.empty(count, 1, self.hidden, dtype=self.dtype, device=device), stage)
        return slots, x

    def send_grad(self, stage: int, grad: torch.Tensor) -> None:
        self._isend(grad.to(self.dtype), stage)

    def recv_grad(self, stage: int, like: torch.Tensor) -> torch.Tensor:
        g = self._recv(torch.empty(like.shape, dtype=self.dtype, device=like.device), stage)
        return g.to(like.dtype)

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


@dataclass
class _Unit:
    """One (micro-batch, step) segment on this stage."""

    x: torch.Tensor | None  # received input (a leaf); None for the embedding pass
    out: torch.Tensor  # the layers' output
    cache: list[torch.Tensor]  # this run's K/V of every layer, flattened (k0, v0, k1, ...)
    past: list[torch.Tensor]  # leaves standing for the previous unit's cache
    fed: torch.Tensor | None = None  # last stage: the leaf the generator got (training)
    wrap: torch.Tensor | None = None  # last stage: the next step's input sent to stage 0


@dataclass
class _MicroBatch:
    mb: dict
    units: dict[int, _Unit] = field(default_factory=dict)
    done: bool = False
    key_slots: torch.Tensor | None = None  # every slot run so far (stages before the last)
    steps: object = None  # the method's step generator (last stage)
    request: LayerRun | None = None  # its pending request (last stage)
    out: LatentOutput | None = None  # the losses (last stage)


def _flat(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [t for pair in kv for t in pair]


def _pairs(flat: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


def forward_backward(scheduler: LatentStepScheduler, microbatches: list[dict], ctx: ParallelContext,
                     activation_dtype: torch.dtype, forward_only: bool = False,
                     autocast: Callable[[], object] | None = None) -> list[dict[str, float]]:
    """Run every (micro-batch, step) unit through this stage, then backpropagate them in
    reverse. Gradients are those of the mean loss over micro-batches. Returns per-micro-batch
    stats (non-empty on the last stage)."""
    stage = scheduler.stage
    links = _Links(ctx, stage.cfg.hidden_size, activation_dtype)
    last = ctx.is_last_stage
    states = [_MicroBatch(mb) for mb in microbatches]
    if last:
        for st in states:
            st.steps = scheduler.steps(st.mb)
    grad = not forward_only
    with torch.enable_grad() if grad else torch.no_grad():
        for k in range(1, scheduler.max_steps + 1):
            for m, st in enumerate(states):
                if not st.done:
                    with autocast() if autocast else contextlib.nullcontext():
                        _forward_unit(scheduler, links, ctx, st, m, k, grad)
    links.wait()
    stats = [scheduler.stats(st.out, st.mb) for st in states] if last else []
    if forward_only:
        return stats
    if last:
        _loss_backward(states)
    for k in range(scheduler.max_steps, 0, -1):
        for m in reversed(range(len(states))):
            st = states[m]
            if k in st.units:
                _backward_unit(links, ctx, st, k)
    links.wait()
    return stats


def _forward_unit(scheduler: LatentStepScheduler, links: _Links, ctx: ParallelContext,
                  st: _MicroBatch, m: int, k: int, grad: bool) -> None:
    stage, mb = scheduler.stage, st.mb
    first, last = ctx.is_first_stage, ctx.is_last_stage
    tokens = mb["tokens"]
    if first and k == 1:
        slots, x = torch.arange(tokens.numel(), device=tokens.device), None
    else:
        slots, x = links.recv_run(ctx.pp_size - 1 if first else ctx.pp_rank - 1)
        if slots is None:  # m finished after step k - 1: tell the stages after this one
            st.done = True
            if not last:
                links.send_run(ctx.pp_rank + 1, None, None)
            return
        x.requires_grad_(grad)
    if last:
        request = next(st.steps) if k == 1 else st.request
        plan, positions, past = request.plan, request.positions, request.past
    else:
        seq = tokens.shape[1]
        positions = torch.arange(seq, device=tokens.device).repeat(tokens.shape[0])[slots]
        past = k > 1 and scheduler.cache_across_steps
        st.key_slots = torch.cat([st.key_slots, slots]) if past else slots  # the cache after this run
        plan = scheduler.step_plan(mb, slots, st.key_slots if past else None)
    past_leaves = []
    if past:
        past_leaves = [c.detach().requires_grad_(grad) for c in st.units[k - 1].cache]
    inp = stage.embed(tokens.reshape(-1)) if x is None else x
    h, kv = stage.run_layers(inp, positions, plan, past=_pairs(past_leaves) if past else None)
    unit = _Unit(x, h, _flat(kv), past_leaves)
    st.units[k] = unit
    if not last:
        links.send_run(ctx.pp_rank + 1, slots, h)
        return
    # the last stage: the method decides who goes on; their inputs go back to stage 0
    fed = h.detach().requires_grad_() if grad else h
    unit.fed = fed if grad else None
    try:
        st.request = st.steps.send(fed)
    except StopIteration as stop:
        st.out, st.request = stop.value, None
        if k < scheduler.max_steps:
            links.send_run(0, None, None)
        return
    unit.wrap = st.request.x
    links.send_run(0, st.request.slots, st.request.x)


def _loss_backward(states: list[_MicroBatch]) -> None:
    """Every micro-batch's loss into its per-step output gradients (and the head's weights)."""
    n = len(states)
    for st in states:
        loss = st.out.loss / n
        st.out = None  # free what only the loss graph needs once it is done
        # retained: the survivors' inputs sent to stage 0 share the final norm's graph
        torch.autograd.backward(loss, retain_graph=True)


def _backward_unit(links: _Links, ctx: ParallelContext, st: _MicroBatch, k: int) -> None:
    unit, pp_rank = st.units[k], ctx.pp_rank
    roots: list[torch.Tensor] = []
    grads: list[torch.Tensor | None] = []
    if ctx.is_last_stage:
        if unit.wrap is not None:  # its survivors ran step k + 1: their input's gradient
            # into the leaf's gradient, next to what the loss gave it
            torch.autograd.backward(unit.wrap, links.recv_grad(0, unit.wrap))
        roots.append(unit.out)
        grads.append(unit.fed.grad if unit.fed.grad is not None else torch.zeros_like(unit.out))
    else:
        roots.append(unit.out)
        grads.append(links.recv_grad(pp_rank + 1, unit.out))
    later = st.units.get(k + 1)
    if later is not None and later.past:  # the K/V this unit handed to step k + 1
        for c, leaf in zip(unit.cache, later.past, strict=True):
            if leaf.grad is not None:
                roots.append(c)
                grads.append(leaf.grad)
    torch.autograd.backward(roots, grads)
    if unit.x is not None:
        g = unit.x.grad if unit.x.grad is not None else torch.zeros_like(unit.x)
        links.send_grad(ctx.pp_size - 1 if ctx.is_first_stage else pp_rank - 1, g)
    st.units.pop(k + 1, None)  # its cache leaves were the last thing holding it
    if k == 1:
        st.units.clear()
