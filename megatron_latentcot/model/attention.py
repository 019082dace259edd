"""Attention of packed queries over packed keys, with the visibility rule carried by a plan.

Tokens travel through the model packed as ``[N, ...]`` (all active (row, position, step) slots
of a micro-batch, sorted row-major: row, then position). A key (row_j, t_j, k_j) is visible to
a query (row_i, t_i, k_i) iff same row, t_j <= t_i, the key was executed, the same document
(when documents are masked), and k_j <= k_i: the cache only ever holds steps <= the current one,
so the step condition holds by construction. One :class:`AttentionPlan` per latent step is
shared by every layer. Two backends compute the same thing:

- ``sdpa``: keys and queries gathered per batch row with an explicit boolean mask (CPU training
  path and the reference);
- ``flex``: ``flex_attention`` over the packed sequences with a block mask built from the
  rule (GPU path; no dense T x (K*T) mask is materialised; forward-only on CPU).

Step 1 of a plain causal batch is the dense fast path (``is_causal``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex")


@dataclass
class AttentionPlan:
    rows: int
    seq: int
    backend: str = "sdpa"
    # Packed metadata: token slot (row * seq + t) of every query / cached key; which cached keys
    # really executed (None = all); document id per token slot (None = no document masking).
    q_slots: torch.Tensor | None = None  # None: dense step-1 layout, queries == keys == all slots
    k_slots: torch.Tensor | None = None
    k_live: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def dense(self) -> bool:
        return self.q_slots is None

    def all_slots(self) -> torch.Tensor:
        return torch.arange(self.rows * self.seq, device=self._device())

    def _device(self) -> torch.device:
        for t in (self.q_slots, self.doc_ids):
            if t is not None:
                return t.device
        return torch.device("cpu")


def causal_plan(rows: int, seq: int, doc_ids: torch.Tensor | None = None,
                backend: str = "sdpa") -> AttentionPlan:
    """Plain causal attention over ``rows`` sequences of ``seq`` tokens (optionally per document)."""
    return AttentionPlan(rows, seq, backend,
                         doc_ids=None if doc_ids is None else doc_ids.reshape(-1))


def latent_plan(q_slots: torch.Tensor, k_slots: torch.Tensor, k_live: torch.Tensor | None,
                rows: int, seq: int, doc_ids: torch.Tensor | None,
                backend: str = "sdpa") -> AttentionPlan:
    """The 2-D causal rule for one latent step (``k_slots`` in cache order)."""
    return AttentionPlan(rows, seq, backend, q_slots, k_slots, k_live,
                         None if doc_ids is None else doc_ids.reshape(-1))


def _doc_start(plan: AttentionPlan) -> torch.Tensor:
    """For every token slot, the position where its document starts (0 without documents)."""
    doc = plan.doc_ids.view(plan.rows, plan.seq)
    pos = torch.arange(plan.seq, device=doc.device).expand_as(doc)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values.reshape(-1)


def visible_pairs(plan: AttentionPlan) -> int:
    """Exact number of (query, key) pairs the rule lets attend (the attention FLOPs' size).

    Documents are contiguous within a row, so "same document and t_j <= t_i" is
    "t_j in [start of t_i's document, t_i]": a count by binary search, no dense mask.
    """
    q = plan.all_slots() if plan.dense else plan.q_slots
    k = plan.all_slots() if plan.dense else plan.k_slots
    if plan.k_live is not None:
        k = k[plan.k_live]
    keys = torch.sort(k).values  # slot = row * seq + t orders keys by (row, t)
    upper = torch.searchsorted(keys, q, right=True)
    lower_slot = q - q % plan.seq + (_doc_start(plan)[q] if plan.doc_ids is not None else 0)
    lower = torch.searchsorted(keys, lower_slot, right=False)
    return int((upper - lower).sum().item())


# -- SDPA -------------------------------------------------------------------------------------

def rows_layout(row_of: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group packed slots by batch row: ([rows, L] indices into the slots, [rows, L] valid)."""
    counts = torch.bincount(row_of, minlength=rows)
    width = int(counts.max().item()) if row_of.numel() else 0
    order = torch.argsort(row_of, stable=True)
    sorted_rows = row_of[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(row_of.numel(), device=row_of.device) - starts[sorted_rows]
    index = torch.zeros(rows, width, dtype=torch.long, device=row_of.device)
    valid = torch.zeros(rows, width, dtype=torch.bool, device=row_of.device)
    index[sorted_rows, slot] = order
    valid[sorted_rows, slot] = True
    return index, valid


def _sdpa_layout(plan: AttentionPlan):
    """Per-row gather indices and the boolean mask, built once per plan."""
    if "sdpa" in plan._cache:
        return plan._cache["sdpa"]
    seq = plan.seq
    if plan.dense:
        mask = None
        if plan.doc_ids is not None:
            doc = plan.doc_ids.view(plan.rows, seq)
            pos = torch.arange(seq, device=doc.device)
            mask = ((pos[None, :] <= pos[:, None]) & (doc[:, :, None] == doc[:, None, :]))[:, None]
        plan._cache["sdpa"] = mask
        return mask
    q_index, q_valid = rows_layout(plan.q_slots // seq, plan.rows)
    k_index, k_valid = rows_layout(plan.k_slots // seq, plan.rows)
    q_pos, k_pos = (plan.q_slots % seq)[q_index], (plan.k_slots % seq)[k_index]
    mask = q_valid[:, :, None] & k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if plan.k_live is not None:
        mask &= plan.k_live[k_index][:, None, :]
    if plan.doc_ids is not None:
        q_doc = plan.doc_ids[plan.q_slots][q_index]
        k_doc = plan.doc_ids[plan.k_slots][k_index]
        mask &= q_doc[:, :, None] == k_doc[:, None, :]
    mask[:, :, 0] |= ~q_valid  # padding queries attend to one real key: no all-masked rows
    plan._cache["sdpa"] = (q_index, q_valid, k_index, mask[:, None])
    return plan._cache["sdpa"]


def _sdpa(q, k, v, plan: AttentionPlan) -> torch.Tensor:
    nq, hq, d = q.shape
    gqa = hq != k.shape[1]
    layout = _sdpa_layout(plan)
    if plan.dense:
        b, t = plan.rows, plan.seq
        qd = q.view(b, t, hq, d).transpose(1, 2)
        kd = k.view(b, t, -1, d).transpose(1, 2)
        vd = v.view(b, t, -1, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=layout,
                                             is_causal=layout is None, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(nq, hq * d)
    q_index, q_valid, k_index, mask = layout
    qd = q[q_index].transpose(1, 2)  # [rows, Hq, Lq, D]
    kd, vd = k[k_index].transpose(1, 2), v[k_index].transpose(1, 2)
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=gqa)
    # Packed queries are row-major, so the valid slots in row order are the packed order.
    return out.transpose(1, 2)[q_valid].reshape(nq, hq * d)


# -- flex_attention ---------------------------------------------------------------------------

def _flex_block_mask(plan: AttentionPlan, n_q: int, n_k: int):
    if "flex" in plan._cache:
        return plan._cache["flex"]
    from torch.nn.attention.flex_attention import create_block_mask

    seq = plan.seq
    q_slots = plan.all_slots() if plan.dense else plan.q_slots
    k_slots = plan.all_slots() if plan.dense else plan.k_slots
    live = plan.k_live if plan.k_live is not None else torch.ones_like(k_slots, dtype=torch.bool)
    doc = plan.doc_ids if plan.doc_ids is not None else torch.zeros(
        plan.rows * seq, dtype=torch.long, device=q_slots.device)

    def rule(b, h, qi, kj):
        qs, ks = q_slots[qi], k_slots[kj]
        return ((qs // seq == ks // seq) & (ks % seq <= qs % seq) & live[kj]
                & (doc[qs] == doc[ks]))

    mask = create_block_mask(rule, None, None, n_q, n_k, device=q_slots.device)
    plan._cache["flex"] = mask
    return mask


_compiled_flex = None


def _flex(q, k, v, plan: AttentionPlan) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    fn = flex_attention
    if q.is_cuda:  # eager flex_attention is a slow reference; compiled is the GPU kernel
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=True)
        fn = _compiled_flex
    nq, hq, d = q.shape
    block_mask = _flex_block_mask(plan, nq, k.shape[0])
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
             block_mask=block_mask, enable_gqa=hq != k.shape[1])
    return out[0].transpose(0, 1).reshape(nq, hq * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              plan: AttentionPlan) -> torch.Tensor:
    """q: [Nq, Hq, D]; k, v: [Nk, Hkv, D] (Hq a multiple of Hkv). Returns [Nq, Hq * D]."""
    return _flex(q, k, v, plan) if plan.backend == "flex" else _sdpa(q, k, v, plan)
