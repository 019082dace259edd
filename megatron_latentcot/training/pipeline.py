"""Forward and backward of one iteration's micro-batches across pipeline stages.

All-forward-then-all-backward (GPipe): simple, and it leaves room for the latent loop, whose
activations change shape every step. Point-to-point messages carry their shape first, so any
stage can send any packed tensor. Each stage's forward of a micro-batch is its own autograd
segment: received activations enter as leaves and their gradients are sent back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_latentcot.parallel import ParallelContext

_MAX_DIMS = 7


def send_tensor(t: torch.Tensor, dst: int) -> None:
    header = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=t.device)
    header[0] = t.dim()
    header[1:t.dim() + 1] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(header, dst)
    dist.send(t.contiguous(), dst)


def recv_tensor(src: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    header = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=device)
    dist.recv(header, src)
    shape = header[1:int(header[0]) + 1].tolist()
    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, src)
    return out


@dataclass
class MicroBatchResult:
    loss: torch.Tensor  # the micro-batch's objective (last stage only), before averaging
    stats: dict[str, float]


# A stage's forward of one micro-batch: (micro-batch, received input or None) ->
# (output to send on, or the loss on the last stage; stats on the last stage).
StageForward = Callable[[dict, torch.Tensor | None], tuple[torch.Tensor, dict[str, float]]]


def forward_backward(stage_forward: StageForward, microbatches: list[dict], ctx: ParallelContext,
                     activation_dtype: torch.dtype, forward_only: bool = False) -> list[dict[str, float]]:
    """Run every micro-batch through this stage, then backpropagate them in reverse.

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
    prev = ctx.stage_rank(ctx.pp_rank - 1) if not ctx.is_first_stage else None
    nxt = ctx.stage_rank(ctx.pp_rank + 1) if not ctx.is_last_stage else None
    inputs, outputs, stats = [], [], []
    grad_ctx = torch.no_grad() if forward_only else torch.enable_grad()
    with grad_ctx:
        for mb in microbatches:
            x = None
            if prev is not None:
                x = recv_tensor(prev, activation_dtype, ctx.device).requires_grad_(not forward_only)
            out, st = stage_forward(mb, x)
            if nxt is not None:
                send_tensor(out.detach(), nxt)
            inputs.append(x)
            outputs.append(out)
            stats.append(st)
    if forward_only:
        return stats
    for i in reversed(range(n)):
        if nxt is None:
            torch.autograd.backward(outputs[i] / n)
        else:
            grad = recv_tensor(nxt, activation_dtype, ctx.device)
            torch.autograd.backward(outputs[i], grad)
        if prev is not None:
            send_tensor(inputs[i].grad, prev)
        outputs[i] = inputs[i] = None  # free the graph's memory as we go
    return stats
