"""Attention of packed queries over packed keys, with the visibility rule carried by a plan.

Tokens travel through the model packed as ``[N, ...]`` (all active (row, position, step) slots
of a micro-batch, sorted row-major: row, then position). An :class:`AttentionPlan` says how
to lay them out per batch row for SDPA and which keys each query may see; the scheduler builds
one plan per latent step and every layer reuses it. Step 1 of a plain causal batch is the
dense fast path (``is_causal``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionPlan:
    rows: int
    # Dense layout: queries and keys are the same ``rows * seq`` slots, row-major.
    seq: int | None = None
    # Gathered layout: per-row indices into the packed queries / keys ([rows, Lq], [rows, Lk]).
    q_index: torch.Tensor | None = None
    q_valid: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    # [rows, 1, Lq, Lk] bool (True = may attend). None in the dense layout = plain causal.
    mask: torch.Tensor | None = None

    @property
    def dense(self) -> bool:
        return self.q_index is None


def causal_plan(rows: int, seq: int, doc_ids: torch.Tensor | None = None) -> AttentionPlan:
    """Plain causal attention over ``rows`` sequences of ``seq`` tokens (optionally per document)."""
    if doc_ids is None:
        return AttentionPlan(rows=rows, seq=seq)
    pos = torch.arange(seq, device=doc_ids.device)
    causal = pos[None, :] <= pos[:, None]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return AttentionPlan(rows=rows, seq=seq, mask=(causal & same_doc)[:, None])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              plan: AttentionPlan) -> torch.Tensor:
    """q: [Nq, Hq, D]; k, v: [Nk, Hkv, D] (Hq a multiple of Hkv). Returns [Nq, Hq * D]."""
    nq, hq, d = q.shape
    gqa = hq != k.shape[1]
    if plan.dense:
        b, t = plan.rows, plan.seq
        qd = q.view(b, t, hq, d).transpose(1, 2)
        kd = k.view(b, t, -1, d).transpose(1, 2)
        vd = v.view(b, t, -1, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=plan.mask,
                                             is_causal=plan.mask is None, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(nq, hq * d)
    assert plan.q_index is not None and plan.k_index is not None and plan.mask is not None
    qd = q[plan.q_index].transpose(1, 2)  # [rows, Hq, Lq, D]
    kd = k[plan.k_index].transpose(1, 2)
    vd = v[plan.k_index].transpose(1, 2)
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=plan.mask, enable_gqa=gqa)
    # Packed queries are row-major, so the valid slots in row order are the packed order.
    return out.transpose(1, 2)[plan.q_valid].reshape(nq, hq * d)
