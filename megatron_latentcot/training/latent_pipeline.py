"""The latent loop across pipeline stages: one latent step is a full pass through every stage.

Units are (micro-batch m, step k); their order on each stage comes from ``schedules.py``.
``1f1b`` (default): forwards in groups of PP micro-batches, step-major within a group, so while
the last stage finishes m's step k the first is on m+1's; backwards in the same groups, steps
reversed, alternating with forwards after a warm-up of ``(PP - s - 1) + (K - 1) PP`` units: at
most ``K PP - s`` units (PP - s/K micro-batches' worth) are alive on stage s, whatever the number
of micro-batches M. ``gpipe``: every forward step-major, then every backward (all M alive).
The last stage sends m's survivors (their slots first: the count changes every step) back to
the first stage for step k+1; an empty message means "m is done" and travels once through the
pipeline, so every stage agrees on which units exist (the others are no-ops everywhere).

Autograd seams: every (stage, m, k) unit is its own graph segment. Received activations enter
it as leaves, and so do earlier steps' K/V caches; their gradients are handed back to the
producing unit's backward together with its output gradient, so no graph is traversed twice.
On the last stage the method's step generator (``LatentStepScheduler.steps``: router, mixing,
losses) hangs off one leaf per step, so m's loss backward (run when m's backward starts) yields
every step's output gradient; the survivors' inputs sent back to stage 0 receive theirs during
step k+1's backward. Gradients only accumulate here: the optimizer reduces them (FSDP2
included) after the last call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_latentcot.model.latent import KVStream, LatentOutput, LatentStepScheduler
from megatron_latentcot.model.llama import LayerRun
from megatron_latentcot.parallel import ParallelContext
from megatron_latentcot.training import schedules
from megatron_latentcot.training.pipeline import P2P, eval_windows


class _Links(P2P):
    """The latent loop's messages: a unit's (slots, activations), or a gradient."""

    def __init__(self, ctx: ParallelContext, plan: schedules.Plan, hidden: int, dtype: torch.dtype):
        super().__init__(ctx, plan)
        self.hidden, self.dtype = hidden, dtype

    def send_run(self, slots: torch.Tensor | None, x: torch.Tensor | None) -> None:
        """(slots, activations) of one unit; ``slots`` None: the micro-batch is done."""
        count = 0 if slots is None else slots.numel()
        self.isend(torch.tensor([count], dtype=torch.int64, device=self.ctx.device))
        if count:
            self.isend(slots)
            self.isend(x.detach().to(self.dtype))

    def recv_run(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        device = self.ctx.device
        count = int(self.recv(torch.zeros(1, dtype=torch.int64, device=device)).item())
        if count == 0:
            return None, None
        slots = self.recv(torch.empty(count, dtype=torch.int64, device=device))
        x = self.recv(torch.empty(count, 1, self.hidden, dtype=self.dtype, device=device))
        return slots, x

    def send_grad(self, grad: torch.Tensor) -> None:
        self.isend(grad.to(self.dtype))

    def recv_grad(self, like: torch.Tensor) -> torch.Tensor:
        g = self.recv(torch.empty(like.shape, dtype=self.dtype, device=like.device))
        return g.to(like.dtype)


@dataclass
class _Unit:
    """One (micro-batch, step) segment on this stage."""

    x: torch.Tensor | None  # received input (a leaf); None for the embedding pass
    out: torch.Tensor | None  # the layers' output (None once backpropagated)
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
    stream: KVStream | None = None  # its K/V stores (stages before the last)
    steps: object = None  # the method's step generator (last stage)
    request: LayerRun | None = None  # its pending request (last stage)
    out: LatentOutput | None = None  # the losses (last stage)
    stats: dict[str, float] = field(default_factory=dict)  # the method's stats (last stage)


def _flat(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [t for pair in kv for t in pair]


def _pairs(flat: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


def forward_backward(scheduler: LatentStepScheduler, microbatches: list[dict], ctx: ParallelContext,
                     activation_dtype: torch.dtype, forward_only: bool = False,
                     autocast: Callable[[], object] | None = None,
                     schedule: str = "1f1b") -> list[dict[str, float]]:
    """Run every (micro-batch, step) unit through this stage and backpropagate it, in
    ``schedule``'s order. Gradients are those of the mean loss over micro-batches. Returns
    per-micro-batch stats (non-empty on the last stage)."""
    states = [_MicroBatch(mb) for mb in microbatches]
    hidden, steps = scheduler.stage.cfg.hidden_size, scheduler.max_steps
    if forward_only:
        with torch.no_grad():
            for window in eval_windows(ctx.pp_size, len(states)):
                plan = schedules.Plan(schedule, ctx.pp_size, steps, len(window), True)
                links = _Links(ctx, plan, hidden, activation_dtype)
                _run(scheduler, links, ctx, [states[m] for m in window], plan, False, autocast)
                links.wait()
    else:
        plan = schedules.Plan(schedule, ctx.pp_size, steps, len(states))
        links = _Links(ctx, plan, hidden, activation_dtype)
        _run(scheduler, links, ctx, states, plan, True, autocast)
        links.wait()
    return [st.stats for st in states] if ctx.is_last_stage else []


def _run(scheduler: LatentStepScheduler, links: _Links, ctx: ParallelContext,
         states: list[_MicroBatch], plan: schedules.Plan, grad: bool,
         autocast: Callable[[], object] | None) -> None:
    """This stage's ops of ``plan`` over ``states`` (indexed as the plan's micro-batches)."""
    n = len(states)
    for op in plan.ops[ctx.pp_rank]:
        links.op = op
        kind, m, k = op
        st = states[m]
        if kind == "F":
            if k == 1 and ctx.is_last_stage:
                st.steps = scheduler.steps(st.mb)
            if not st.done:
                with torch.enable_grad() if grad else torch.no_grad(), \
                        autocast() if autocast else contextlib.nullcontext():
                    _forward_unit(scheduler, links, ctx, st, k, grad)
            continue
        if ctx.is_last_stage and k == scheduler.max_steps:  # m's backward starts with its loss
            loss = st.out.loss / n
            st.out = None  # free what only the loss graph needs once it is done
            # retained: the survivors' inputs sent to stage 0 share the final norm's graph
            torch.autograd.backward(loss, retain_graph=True)
            del loss  # (the head's graph: nothing else holds it)
        if k in st.units:
            _backward_unit(links, ctx, st, k)


def _forward_unit(scheduler: LatentStepScheduler, links: _Links, ctx: ParallelContext,
                  st: _MicroBatch, k: int, grad: bool) -> None:
    stage, mb = scheduler.stage, st.mb
    first, last = ctx.is_first_stage, ctx.is_last_stage
    tokens = mb["tokens"]
    if first and k == 1:
        slots, x = torch.arange(tokens.numel(), device=tokens.device), None
    else:
        slots, x = links.recv_run()
        if slots is None:  # m finished after step k - 1: tell the stages after this one
            st.done = True
            if not grad:
                st.units, st.stream = {}, None
            if not last:
                links.send_run(None, None)
            return
        x.requires_grad_(grad)
    if last:
        request = next(st.steps) if k == 1 else st.request
        plan, positions, past, stream = request.plan, request.positions, request.past, request.cache
    else:
        seq = tokens.shape[1]
        positions = torch.arange(seq, device=tokens.device).repeat(tokens.shape[0])[slots]
        past = k > 1 and scheduler.cache_across_steps
        st.key_slots = torch.cat([st.key_slots, slots]) if past else slots  # the cache after this run
        plan = scheduler.step_plan(mb, slots, st.key_slots if past else None)
        if k == 1 and scheduler.cache_across_steps and scheduler.max_steps > 1:
            st.stream = KVStream(scheduler.cache_columns(seq))
        stream = st.stream
    past_leaves, caches = [], None
    if stream is not None:  # the stores are shared; the views of earlier keys enter as leaves
        stores = [store for store, _ in stream.layer_caches(len(stage.layers))]
        if past:
            past_leaves = [c.detach().requires_grad_(grad) for c in st.units[k - 1].cache]
        caches = list(zip(stores, _pairs(past_leaves) if past else [None] * len(stores)))
    inp = stage.embed(tokens.reshape(-1)) if x is None else x
    h, kv = stage.run_layers(inp, positions, plan, past=caches)
    unit = _Unit(x, h, _flat([views for _, views in kv]) if caches else [], past_leaves)
    st.units[k] = unit
    if not grad:  # evaluation: only the cache the next step reads is kept
        st.units.pop(k - 1, None)
        if k == scheduler.max_steps:  # nothing reads this micro-batch's K/V any more
            st.units, st.stream = {}, None
    if not last:
        links.send_run(slots, h)
        return
    # the last stage: the method decides who goes on; their inputs go back to stage 0
    fed = h.detach().requires_grad_() if grad else h
    unit.fed = fed if grad else None
    try:
        st.request = st.steps.send(fed)
    except StopIteration as stop:
        st.out, st.request, st.steps = stop.value, None, None
        st.stats = scheduler.stats(st.out, mb)
        if not grad:
            st.out, st.units = None, {}
        if k < scheduler.max_steps:
            links.send_run(None, None)
        return
    unit.wrap = st.request.x
    links.send_run(st.request.slots, st.request.x)


def _backward_unit(links: _Links, ctx: ParallelContext, st: _MicroBatch, k: int) -> None:
    unit = st.units[k]
    roots: list[torch.Tensor] = []
    grads: list[torch.Tensor | None] = []
    if ctx.is_last_stage:
        if unit.wrap is not None:  # its survivors ran step k + 1: their input's gradient
            # into the leaf's gradient, next to what the loss gave it
            torch.autograd.backward(unit.wrap, links.recv_grad(unit.wrap))
        roots.append(unit.out)
        grads.append(unit.fed.grad if unit.fed.grad is not None else torch.zeros_like(unit.out))
    else:
        roots.append(unit.out)
        grads.append(links.recv_grad(unit.out))
    later = st.units.get(k + 1)
    if later is not None and later.past:  # the K/V this unit handed to step k + 1
        for c, leaf in zip(unit.cache, later.past, strict=True):
            if leaf.grad is not None:
                roots.append(c)
                grads.append(leaf.grad)
    torch.autograd.backward(roots, grads)
    if unit.x is not None:
        links.send_grad(unit.x.grad if unit.x.grad is not None else torch.zeros_like(unit.x))
    st.units.pop(k + 1, None)  # its cache leaves were the last thing holding it
    if k == 1:
        st.units.clear()
        st.stream = None  # the K/V stores: nothing reads them any more
    else:  # only ``past`` is still needed: its gradients go to step k - 1's backward
        unit.x = unit.out = unit.fed = unit.wrap = None
        unit.cache = []
