"""Mixture-of-Recursions (Bae et al. 2025; docs/baselines_ponderlm2_mor.md 2 and 3.2).

Middle-cycle sharing: physical layers [first, block_1..block_D, last] with D = floor((L-2)/N_r);
the block runs N_r times (recursions). Routers (replicated across TP, fp32 like ours):

- ``expert`` (the authors' default): router r scores the candidates S_{r-1} (S_0 = all) on the raw
  residual stream, g = alpha * sigmoid(a); per row the top k_r = max(1, floor(c_r T)) by g (ties:
  the earlier position) form S_r, which runs the block; h <- h + g F(h) on S_r. Aux loss: BCE of
  a against membership in S_r over the candidates, summed over r, x ``mor.aux_coeff``.
- ``token``: one router on the first layer's output, p = softmax over N_r, depth d = argmax + 1,
  w = alpha * p[d]; recursion r runs the tokens with d >= r (F's outputs carried ungated);
  out = h0 + w F^d(h0). Losses: balancing sum_r P_r f_r and the z-loss.

Recursion-wise K/V (the authors' default): each recursion's selected tokens attend only among
themselves, causally by original position (and per document), packed: halted tokens cost
nothing in later recursions. Every token runs the first and last layers.

Decoding (the decoder's streams: first layer, one per recursion, last layer): token-choice is
causal as trained; expert-choice's per-row top-k looks at future tokens, so it decodes with the
causal rule sigmoid(a) >= 0.5 (nested), which ``mor.expert_selection: threshold`` also trains /
evaluates with (docs/baselines_ponderlm2_mor.md 2.2, 3.2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megatron_latentcot.config import Config, mor_base_depth, mor_capacities
from megatron_latentcot.model.attention import visible_pairs
from megatron_latentcot.model.llama import LayerRun, LlamaStage, upcast

if TYPE_CHECKING:
    from megatron_latentcot.model.latent import Feed, LatentOutput


def physical_layers(cfg: Config) -> int:
    """Layers MoR's stage holds: the first, the shared block, the last."""
    return 2 + mor_base_depth(cfg.model.num_layers, cfg.mor.num_recursion)


def layer_groups(cfg: Config) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Physical layer ids of (the first layer, the shared block, the last layer)."""
    depth = physical_layers(cfg) - 2
    return (0,), tuple(range(1, depth + 1)), (depth + 1,)


class MoRRouter(nn.Module):
    """MoR's routers as one weight [outputs, H], no bias: expert-choice row r is recursion r's
    Linear(H, 1); token-choice the Linear(H, N_r). Logits in float32 (float64 in tests), never
    under autocast; called through ``forward`` so FSDP2 gathers it."""

    def __init__(self, hidden: int, outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(outputs, hidden))  # drawn by init_weights()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, h: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """h [n, 1, H] -> logits [n, outputs] (``index``: only that row of the weight, [n, 1])."""
        hf = upcast(h).reshape(h.shape[0], -1)
        w = self.weight if index is None else self.weight[index:index + 1]
        with torch.autocast(hf.device.type, enabled=False):
            return hf @ w.to(hf.dtype).T


def build_routers(cfg: Config) -> MoRRouter:
    """N_r expert-choice routers, or the one token-choice router (N_r outputs)."""
    return MoRRouter(cfg.model.hidden_size, cfg.mor.num_recursion)


def capacity_tokens(capacity: float, seq: int) -> int:
    """k_r = max(1, floor(c_r T)): the tokens per row recursion r keeps (expert-choice)."""
    return max(1, int(capacity * seq))


def alpha(cfg: Config) -> float:
    """The gate scale: ``mor.alpha``, or the authors' 0.1 (expert) / 1.0 (token)."""
    if cfg.mor.alpha is not None:
        return cfg.mor.alpha
    return 0.1 if cfg.mor.router == "expert" else 1.0


def mor(stage: LlamaStage, feed: Feed, cfg: Config) -> Generator[LayerRun, torch.Tensor,
                                                               LatentOutput]:
    """MoR as layer runs (first layer, recursions, last layer) over the feed's tokens: a
    training micro-batch, or a decoder call's new tokens over the K/V of the rows' earlier ones
    (streams: the first layer, one per recursion, the last layer). Expert-choice decodes, and
    trains with ``mor.expert_selection: threshold``, by the causal rule sigmoid(a) >= 0.5."""
    from megatron_latentcot.model.latent import LatentOutput, StepRecord, plan_for

    first, block, last = layer_groups(cfg)
    seq, new = feed.seq, feed.slots
    n, device = new.numel(), new.device
    doc = feed.mb.get("doc_ids")
    records: list[StepRecord] = []
    steps = torch.zeros(n, dtype=torch.long, device=device)

    def run(x: torch.Tensor | None, index: torch.Tensor, stream: int,
            layers: tuple[int, ...]) -> Generator[LayerRun, torch.Tensor, torch.Tensor]:
        """``layers`` on the tokens ``index`` (of the feed's, row-major), attending to the
        earlier tokens in stream ``stream`` and among themselves (causal by position)."""
        q = new[index]
        kv = feed.stream(stream)
        keys, live = feed.keys(kv, q, seq, 1)
        plan = plan_for(feed.rows, seq, doc, stage.attention_backend, q, keys, live)
        records.append(StepRecord(q.numel(), q.numel(), visible_pairs(plan), layers=len(layers)))
        return (yield dataclasses.replace(feed.run(x, q, seq, plan, kv), layers=layers))

    everyone = torch.arange(n, device=device)
    h = yield from run(feed.token_input(stage), everyone, 0, first)
    scale, replace = alpha(cfg), cfg.mor.combine == "replace"
    if cfg.mor.router == "expert":
        topk = cfg.mor.expert_selection == "topk" and not feed.decoding
        active, per_row = everyone, seq  # the candidates S_{r-1}
        aux = torch.zeros((), dtype=upcast(h).dtype, device=device)
        router_tokens = 0
        for r, c in enumerate(mor_capacities(cfg.mor)):
            if active.numel() == 0:
                break
            a = stage.mor_router(h[active], r).squeeze(1)
            router_tokens += active.numel()
            g = scale * torch.sigmoid(a)
            if topk:  # per row the k_r largest g; a stable sort ranks equal g by position
                rows, keep = feed.rows, capacity_tokens(c, seq)
                order = torch.sort(g.detach().view(rows, per_row), dim=1, descending=True,
                                   stable=True).indices[:, :keep]
                chosen = torch.sort(order, dim=1).values  # back to position order
                local = (chosen + per_row * torch.arange(rows, device=device)[:, None]).view(-1)
                per_row = keep
            else:  # each token on its own: continue iff sigmoid(a) >= 0.5
                local = (a.detach() >= 0).nonzero().squeeze(1)
            member = torch.zeros_like(a).index_fill(0, local, 1.0)
            aux = aux + F.binary_cross_entropy_with_logits(a, member)
            sel = active[local]
            if sel.numel():
                steps[sel] += 1
                y = yield from run(h[sel], sel, r + 1, block)
                if replace:
                    h = h.index_copy(0, sel, y)
                else:
                    h = h.index_add(0, sel, (g[local][:, None, None] * upcast(y)).to(h.dtype))
            active = sel
        router_loss = cfg.mor.aux_coeff * aux
    else:
        logits = stage.mor_router(h)  # [n, N_r]
        router_tokens = n * logits.shape[1]  # one N_r-output router: N_r x a 1-output one
        p = torch.softmax(logits, dim=-1)
        depth = p.detach().argmax(dim=-1)  # 0-based; the first maximum on ties
        w = scale * p.gather(1, depth[:, None]).squeeze(1)
        x = h
        for r in range(cfg.mor.num_recursion):
            sel = (depth >= r).nonzero().squeeze(1)
            if sel.numel() == 0:
                break
            steps[sel] += 1
            x = x.index_copy(0, sel, (yield from run(x[sel], sel, r + 1, block)))
        h = x if replace else (upcast(h) + w[:, None, None] * upcast(x)).to(h.dtype)
        frac = torch.bincount(depth, minlength=p.shape[1]).to(p.dtype) / max(n, 1)
        balance = (p.mean(dim=0) * frac * p.shape[1]).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        router_loss = cfg.mor.bal_coeff * balance + cfg.mor.z_coeff * z_loss

    h = yield from run(h, everyone, cfg.mor.num_recursion + 1, last)
    lm_loss, logits_out = feed.head(stage, stage.final_norm(h))
    if not feed.labelled:
        router_loss = torch.zeros_like(router_loss)
    return LatentOutput(loss=lm_loss + router_loss.to(lm_loss.dtype), lm_loss=lm_loss,
                        adaptive_loss=router_loss, steps=steps, records=records,
                        head_tokens=n, router_tokens=router_tokens, logits=logits_out)
