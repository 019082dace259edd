"""Forward and backward of one iteration's micro-batches across pipeline stages (one pass per
micro-batch: K = 1 models; the latent loop is ``latent_pipeline.py``).

The order of units comes from ``schedules.py``: ``1f1b`` (default; warm-up, one forward one
backward, cool-down: at most PP - s micro-batches alive on stage s) or ``gpipe`` (every forward,
then every backward: all M alive). Both have the bubble (PP - 1) / (M + PP - 1). Messages carry
their shape first, so any stage can send any tensor. Each stage's forward of a micro-batch is its
own autograd segment: received activations enter as leaves and their gradients are sent back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_latentcot.parallel import ParallelContext
from megatron_latentcot.training import schedules

_MAX_DIMS = 7


class P2P:
    """Non-blocking sends and blocking receives between pipeline stages, driven by a
    ``schedules.Plan``.

    Each (kind, direction) of message travels on its own communicator
    (``ParallelContext.p2p_group``), in the same order at both ends (``schedules.check_links``),
    so no two ranks ever wait on each other's sends on one NCCL stream. A send is waited for
    (its buffer released) once a message from its receiver proves the receiving op done: a
    peer that sent op j has finished every op before j. So pending buffers stay bounded by the
    schedule, not by M.
    """

    def __init__(self, ctx: ParallelContext, plan: schedules.Plan):
        self.ctx, self.plan = ctx, plan
        self.pending: list[tuple[int, int, dist.Work, torch.Tensor]] = []  # (peer, its op, ...)
        self.op: schedules.Op = ("F", 0, 1)  # the op being run (set by the driver)

    def isend(self, t: torch.Tensor) -> None:
        """Send part of the current op's message to its receiver."""
        peer, index = self.plan.consumer(self.op, self.ctx.pp_rank)
        t = t.contiguous()
        group = self.ctx.p2p_group(self.op[0], upward=peer > self.ctx.pp_rank)
        work = dist.isend(t, self.ctx.stage_rank(peer), group=group)
        self.pending.append((peer, index, work, t))

    def recv(self, t: torch.Tensor) -> torch.Tensor:
        """Receive (into ``t``) part of the message the current op takes."""
        peer, index = self.plan.producer(self.op, self.ctx.pp_rank)
        group = self.ctx.p2p_group(self.op[0], upward=self.ctx.pp_rank > peer)
        dist.recv(t, self.ctx.stage_rank(peer), group=group)
        self._release(peer, index)
        return t

    def _release(self, peer: int, before: int) -> None:
        keep = []
        for entry in self.pending:
            if entry[0] == peer and entry[1] < before:
                entry[2].wait()  # gloo: received already, returns at once (NCCL keeps its
                # own reference to the buffer and never blocks the host here)
            else:
                keep.append(entry)
        self.pending = keep

    def send_tensor(self, t: torch.Tensor) -> None:
        header = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=t.device)
        header[0] = t.dim()
        header[1:t.dim() + 1] = torch.tensor(t.shape, dtype=torch.int64)
        self.isend(header)
        self.isend(t)

    def recv_tensor(self, dtype: torch.dtype) -> torch.Tensor:
        header = self.recv(torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=self.ctx.device))
        shape = header[1:int(header[0]) + 1].tolist()
        return self.recv(torch.empty(shape, dtype=dtype, device=self.ctx.device))

    def wait(self) -> None:
        for _, _, work, _ in self.pending:
            work.wait()
        self.pending.clear()


def eval_windows(pp: int, micro: int) -> list[range]:
    """Forward-only runs in windows of 4 PP micro-batches, every send waited at a window's
    end: nothing acknowledges a forward send without backward, so this bounds the buffers."""
    size = 4 * pp
    return [range(i, min(i + size, micro)) for i in range(0, micro, size)]


# A stage's forward of one micro-batch: (micro-batch, received input or None) ->
# (output to send on, or the loss on the last stage; stats on the last stage).
StageForward = Callable[[dict, torch.Tensor | None], tuple[torch.Tensor, dict[str, float]]]


def forward_backward(stage_forward: StageForward, microbatches: list[dict], ctx: ParallelContext,
                     activation_dtype: torch.dtype, forward_only: bool = False,
                     schedule: str = "1f1b") -> list[dict[str, float]]:
    """Run every micro-batch through this stage and backpropagate it, in ``schedule``'s order.

    The loss of each micro-batch is divided by the number of micro-batches, so gradients
    are those of the mean. Returns per-micro-batch stats (non-empty on the last stage).
    """
    n = len(microbatches)
    if ctx.pp_size == 1 and not forward_only:  # no pipeline: keep one micro-batch alive at a time
        stats = []
        for mb in microbatches:
            loss, st = stage_forward(mb, None)
            torch.autograd.backward(loss / n)
            stats.append(st)
        return stats
    stats: list[dict[str, float]] = [{} for _ in range(n)]
    if forward_only:
        with torch.no_grad():
            for window in eval_windows(ctx.pp_size, n):
                p2p = P2P(ctx, schedules.Plan(schedule, ctx.pp_size, 1, len(window), True))
                for i, m in enumerate(window):
                    p2p.op = ("F", i, 1)
                    _forward(stage_forward, microbatches[m], p2p, ctx, activation_dtype, False,
                             stats, m)
                p2p.wait()
        return stats
    plan = schedules.Plan(schedule, ctx.pp_size, 1, n)
    p2p = P2P(ctx, plan)
    inputs: dict[int, torch.Tensor | None] = {}
    outputs: dict[int, torch.Tensor] = {}
    for op in plan.ops[ctx.pp_rank]:
        p2p.op = op
        kind, m, _ = op
        if kind == "F":
            inputs[m], outputs[m] = _forward(stage_forward, microbatches[m], p2p, ctx,
                                             activation_dtype, True, stats, m)
            continue
        x, out = inputs.pop(m), outputs.pop(m)  # free the graph's memory as we go
        if ctx.is_last_stage:
            torch.autograd.backward(out / n)
        else:
            torch.autograd.backward(out, p2p.recv_tensor(activation_dtype))
        if x is not None:
            p2p.send_tensor(x.grad)
    p2p.wait()
    return stats


def _forward(stage_forward: StageForward, mb: dict, p2p: P2P, ctx: ParallelContext,
             dtype: torch.dtype, grad: bool, stats: list[dict[str, float]], m: int):
    """One micro-batch's forward on this stage: (received input leaf, output or loss)."""
    x = None
    if not ctx.is_first_stage:
        x = p2p.recv_tensor(dtype).requires_grad_(grad)
    with torch.enable_grad() if grad else torch.no_grad():
        out, st = stage_forward(mb, x)
    if not ctx.is_last_stage:
        p2p.send_tensor(out.detach())
    stats[m] = st
    return x, out
