"""Attention of packed queries over packed keys, with the visibility rule carried by a plan.

Tokens travel through the model packed as ``[N, ...]`` (all active (row, position, step) slots
of a micro-batch, sorted row-major: row, then position). A key (row_j, t_j, k_j) is visible to
a query (row_i, t_i, k_i) iff same row, t_j <= t_i, the key was executed, the same document
(when documents are masked), and k_j <= k_i: the cache only ever holds steps <= the current one,
so the step condition holds by construction. Documents are contiguous runs of a row (the
dataset's cumulative EOD count), so "same document and t_j <= t_i" is "t_j in [start of t_i's
document, t_i]". One :class:`AttentionPlan` per latent step is shared by every layer. Both
backends group queries and keys per batch row (:func:`row_layout`) and compute the same thing:

- ``sdpa``: an explicit boolean (queries x keys) mask per row (CPU training path and reference);
- ``flex``: ``flex_attention`` with batch rows as its batch dimension and a ``BlockMask`` built
  at block granularity from per-block position bounds (:func:`flex_block_mask`): integers per
  (query block, key block), never per pair; an exact elementwise rule inside partial blocks.
  Row widths are bucketed to multiples of :data:`BLOCK` (at least two blocks) and the rule
  captures only tensors, so compiled flex keeps a small fixed set of graphs over a whole run
  (GPU path; forward-only on CPU).

Step 1 of a plain causal batch is the dense fast path (``is_causal``) on SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex")
BLOCK = 128  # flex tile (queries and keys); flex row widths are multiples of it
_DEAD = 2**30  # the position a dead or padding key takes: after every query


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
    if plan.doc_ids is None:
        return torch.zeros(plan.rows * plan.seq, dtype=torch.long, device=plan._device())
    doc = plan.doc_ids.view(plan.rows, plan.seq)
    pos = torch.arange(plan.seq, device=doc.device).expand_as(doc)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values.reshape(-1)


def visible_pairs(plan: AttentionPlan) -> int:
    """Exact number of (query, key) pairs the rule lets attend (the attention FLOPs' size):
    per query a count by binary search over the sorted keys, no dense mask."""
    q = plan.all_slots() if plan.dense else plan.q_slots
    k = plan.all_slots() if plan.dense else plan.k_slots
    if plan.k_live is not None:
        k = k[plan.k_live]
    keys = torch.sort(k).values  # slot = row * seq + t orders keys by (row, t)
    upper = torch.searchsorted(keys, q, right=True)
    lower = torch.searchsorted(keys, q - q % plan.seq + _doc_start(plan)[q], right=False)
    return int((upper - lower).sum().item())


# -- per-row layout (both backends) -------------------------------------------------------------

def flex_width(n: int, block: int = BLOCK) -> int:
    """A flex row width: ``n`` rounded up to whole blocks, at least two (a one-block dimension
    would be specialised by the compiler: one more graph)."""
    return block * max(2, -(-n // block))


def rows_layout(row_of: torch.Tensor, rows: int, block: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group packed slots by batch row: ([rows, L] indices into the slots, [rows, L] valid,
    [N] each slot's column).

    L is the widest row (``flex_width`` of it with a ``block``), keeping the packed order within
    each row. O(N) when the slots are already grouped by row (training's row-major packing),
    O(N log N) otherwise (the decoder's append-ordered cache). Appending slots to a cache keeps
    every earlier slot's column: the in-place K/V cache (:class:`KVStore`) relies on it.
    """
    counts = torch.bincount(row_of, minlength=rows)
    widest = int(counts.max().item()) if row_of.numel() else 0
    width = widest if block is None else flex_width(widest, block)
    if bool((row_of[1:] >= row_of[:-1]).all()):
        sorted_rows, order = row_of, torch.arange(row_of.numel(), device=row_of.device)
    else:
        sorted_rows, order = torch.sort(row_of, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(row_of.numel(), device=row_of.device) - starts[sorted_rows]
    index = torch.zeros(rows, width, dtype=torch.long, device=row_of.device)
    valid = torch.zeros(rows, width, dtype=torch.bool, device=row_of.device)
    index[sorted_rows, slot] = order
    valid[sorted_rows, slot] = True
    column = torch.empty_like(slot)
    column[order] = slot
    return index, valid, column


@dataclass
class RowLayout:
    """A plan's queries and keys grouped per batch row, and the rule as positions.

    Row r holds queries ``q_index[r]`` (into the packed queries; real where ``q_valid``) and
    keys ``k_index[r]``. Key j is visible to query i iff
    ``q_start[r, i] <= k_pos[r, j] <= q_pos[r, i]``: a padding query sits at -1, a dead or
    padding key at ``_DEAD``. Memory: a few integers per query and per key slot.
    """

    q_index: torch.Tensor
    q_valid: torch.Tensor
    k_index: torch.Tensor
    q_pos: torch.Tensor  # int32 [rows, Lq]
    q_start: torch.Tensor  # int32 [rows, Lq]: the query's document start
    k_pos: torch.Tensor  # int32 [rows, Lk]
    k_column: torch.Tensor  # [Nk] column of each packed key in its row

    def mask(self) -> torch.Tensor:
        """The dense [rows, Lq, Lk] rule (SDPA's mask; O(pairs): never for flex)."""
        k = self.k_pos[:, None, :]
        return (k <= self.q_pos[:, :, None]) & (k >= self.q_start[:, :, None])


def row_layout(plan: AttentionPlan, block: int | None = None) -> RowLayout:
    """Queries and keys of ``plan`` per row (widths: :func:`flex_width` with a ``block``)."""
    seq = plan.seq
    q = plan.all_slots() if plan.dense else plan.q_slots
    k = q if plan.dense else plan.k_slots
    q_index, q_valid, q_column = rows_layout(q // seq, plan.rows, block)
    k_index, k_valid, k_column = ((q_index, q_valid, q_column) if plan.dense
                                  else rows_layout(k // seq, plan.rows, block))
    k_real = k_valid if plan.k_live is None else k_valid & plan.k_live[k_index]
    q_pos = torch.where(q_valid, (q % seq)[q_index], -1)
    q_start = torch.where(q_valid, _doc_start(plan)[q][q_index], 0)
    k_pos = torch.where(k_real, (k % seq)[k_index], _DEAD)
    return RowLayout(q_index, q_valid, k_index, q_pos.int(), q_start.int(), k_pos.int(), k_column)


def key_layout(plan: AttentionPlan) -> RowLayout:
    """The row layout the plan's backend reads its keys in (built once per plan)."""
    if plan.backend == "flex":
        return flex_block_mask(plan, BLOCK)[1]
    if "rows" not in plan._cache:
        plan._cache["rows"] = row_layout(plan)
    return plan._cache["rows"]


# -- SDPA -------------------------------------------------------------------------------------

def _sdpa_layout(plan: AttentionPlan):
    """Per-row gather indices and the boolean mask, built once per plan."""
    if "sdpa" in plan._cache:
        return plan._cache["sdpa"]
    if plan.dense:  # queries == keys == all slots in row-major order: no gather
        layout = None if plan.doc_ids is None else row_layout(plan).mask()[:, None]
    else:
        lay = key_layout(plan)
        mask = lay.mask()
        mask[:, :, 0] |= ~lay.q_valid  # padding queries attend to one real key: no all-masked rows
        layout = (lay.q_index, lay.q_valid, lay.k_index, mask[:, None])
    plan._cache["sdpa"] = layout
    return layout


def _sdpa(q, k, v, plan: AttentionPlan) -> torch.Tensor:
    nq, hq, d = q.shape
    gqa = hq != k.shape[-2]
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
    kd, vd = _key_rows(k, k_index), _key_rows(v, k_index)
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=gqa)
    # Packed queries are row-major, so the valid slots in row order are the packed order.
    return out.transpose(1, 2)[q_valid].reshape(nq, hq * d)


# -- flex_attention ---------------------------------------------------------------------------

def block_classes(lay: RowLayout, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, Lq/block, Lk/block] partial, full) blocks of ``lay``'s rule, from per-block bounds.

    Full: every query real, every key live, and max key <= min query and min key >= the latest
    document start, i.e. every pair visible (exact). Partial: the bounds allow some visible pair
    and the block is not full (a superset of the blocks with a visible pair; the mask_mod
    decides each pair). Every other block is skipped: none of its pairs is visible.
    """
    rows = lay.q_pos.shape[0]
    qp, qs = lay.q_pos.view(rows, -1, block), lay.q_start.view(rows, -1, block)
    kp = lay.k_pos.view(rows, -1, block)
    q_real, k_live = qp >= 0, kp < _DEAD
    q_hi, q_lo = qp.amax(-1)[..., None], qp.masked_fill(~q_real, _DEAD).amin(-1)[..., None]
    s_hi, s_lo = qs.amax(-1)[..., None], qs.masked_fill(~q_real, _DEAD).amin(-1)[..., None]
    k_lo, k_hi = kp.amin(-1)[:, None], kp.masked_fill(~k_live, -1).amax(-1)[:, None]
    some = (k_lo <= q_hi) & (k_hi >= s_lo)
    full = (q_real.all(-1)[..., None] & k_live.all(-1)[:, None] & (k_hi <= q_lo) & (k_lo >= s_hi))
    return some & ~full, full


def _block_lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, n, m] selected blocks -> (count [rows, 1, n], indices [rows, 1, n, m]), the
    selected ones first, in order (``BlockMask``'s kv_num_blocks / kv_indices, or q_*)."""
    count = sel.sum(-1, dtype=torch.int32)
    index = torch.argsort(sel.to(torch.uint8), dim=-1, descending=True, stable=True)
    return count[:, None], index.to(torch.int32)[:, None]


def _mask_mod(lay: RowLayout):
    """The elementwise rule for partial blocks. It captures tensors only (no Python ints), so
    compiled flex guards on their shapes, not their values or the closure: no recompiles."""
    q_pos, q_start, k_pos = lay.q_pos, lay.q_start, lay.k_pos

    def mask_mod(b, h, q_idx, kv_idx):
        key = k_pos[b, kv_idx]
        return (key <= q_pos[b, q_idx]) & (key >= q_start[b, q_idx])

    return mask_mod


def flex_block_mask(plan: AttentionPlan, block: int = BLOCK):
    """The plan's ``BlockMask`` (batch = rows, one head broadcast) and its row layout, built
    once per plan and shared by every layer; :func:`flex_mask_bytes` says what it holds."""
    key = f"flex{block}"
    if key not in plan._cache:
        from torch.nn.attention.flex_attention import BlockMask

        lay = row_layout(plan, block)
        partial, full = block_classes(lay, block)
        # key blocks per query block, then (for backward) query blocks per key block
        lists = [t for sel in (partial, full, partial.mT, full.mT) for t in _block_lists(sel)]
        mask = BlockMask((lay.q_pos.shape[1], lay.k_pos.shape[1]), *lists,
                         BLOCK_SIZE=(block, block), mask_mod=_mask_mod(lay))
        plan._cache[key] = (mask, lay)
    return plan._cache[key]


def flex_mask_bytes(rows: int, width_q: int, width_k: int, block: int = BLOCK,
                    keys: int | None = None) -> int:
    """Bytes a :func:`flex_block_mask` keeps for ``rows`` rows of ``width_q`` queries over
    ``width_k`` keys (flex widths; ``keys`` packed keys, at most all of them): the row layout
    (index int64, valid, positions int32, each packed key's column int64) and the partial and
    full block lists in both orientations (int32): per row, a few integers per query and key
    slot and four per (query block, key block), never per pair."""
    nq, nk = width_q // block, width_k // block
    layout = (8 + 1 + 4 + 4) * width_q + (8 + 4) * width_k
    keys = rows * width_k if keys is None else keys
    return rows * (layout + 2 * 4 * (nq + nq * nk + nk + nk * nq)) + 8 * keys


COMPILE_ON_CPU = False  # compiled flex on CPU too (forward only; tests count its graphs)
_compiled_flex = None


def _flex_fn(device: torch.device):
    """Eager flex_attention is a slow dense reference; compiled is the GPU kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if device.type == "cpu" and not COMPILE_ON_CPU:
        return flex_attention
    # automatic dynamic shapes: first shapes static, then one graph with dynamic widths
    _compiled_flex = _compiled_flex or torch.compile(flex_attention)
    return _compiled_flex


def _flex(q, k, v, plan: AttentionPlan) -> torch.Tensor:
    nq, hq, d = q.shape
    mask, lay = flex_block_mask(plan, BLOCK)  # (BLOCK read now: tests vary it)
    identity = plan.dense and lay.q_index.shape[1] == plan.seq  # rows need no padding

    def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [rows, H, L, D]
        return x.view(plan.rows, plan.seq, *x.shape[1:]).transpose(1, 2) if identity \
            else _key_rows(x, index)

    out = _flex_fn(q.device)(rows(q, lay.q_index), rows(k, lay.k_index), rows(v, lay.k_index),
                             block_mask=mask, enable_gqa=hq != k.shape[-2])
    return out.transpose(1, 2)[lay.q_valid].reshape(nq, hq * d)


def _key_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Packed slots [N, H, D] grouped per row by ``index`` (a copy), or keys already in the
    row layout (a :class:`KVStore` view [rows, L, H, D]: read in place); -> [rows, H, L, D]."""
    return (x if x.dim() == 4 else x[index]).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              plan: AttentionPlan) -> torch.Tensor:
    """q: [Nq, Hq, D]; k, v: [Nk, Hkv, D] packed in the plan's key order, or (non-dense plans)
    the keys already in :func:`key_layout`'s rows, [rows, Lk, Hkv, D] (a :class:`KVStore`
    view). Hq a multiple of Hkv. Returns [Nq, Hq * D]."""
    return _flex(q, k, v, plan) if plan.backend == "flex" else _sdpa(q, k, v, plan)


# -- the K/V cache, written in place -----------------------------------------------------------

def cache_capacity(keys: int, backend: str) -> int:
    """Columns a :class:`KVStore` needs for rows of up to ``keys`` keys under ``backend``."""
    return flex_width(keys) if backend == "flex" else keys


def latent_cache_columns(max_steps: int, seq: int, backend: str, sp_size: int = 1) -> int:
    """Columns per row of a latent-loop micro-batch's :class:`KVStore`: every (t, k) slot the
    steps can reach, and under sequence parallelism over ``sp_size`` ranks the up to
    ``sp_size - 1`` padding queries each later step may add to one row."""
    return cache_capacity(max_steps * seq + (max_steps - 1) * (sp_size - 1), backend)


class KVStore:
    """One layer's K/V of one stream (a training micro-batch's latent steps, or a decoder's
    rows), preallocated ``[rows, capacity, Hkv, D]`` in :func:`key_layout`'s row layout: column
    j of row r is the row's j-th key in cache order. A run writes its own keys into their
    columns and attention reads the first L columns as they are, so no step concatenates or
    regathers the cache (a step-k read used to copy all k steps' keys, twice). Training sizes it
    for every (t, k) slot the steps can reach; a decoder's grows by doubling when full."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def reserve(self, like: torch.Tensor, rows: int, width: int) -> None:
        """Storage for at least ``width`` columns (zeros: unwritten columns are masked, and a
        masked key must be finite for its zero weight to cancel it)."""
        if self.k is not None and self.k.shape[1] >= width:
            return
        capacity = max(width, self.capacity, 2 * (0 if self.k is None else self.k.shape[1]))
        shape = (rows, capacity, *like.shape[1:])
        k, v = (like.new_zeros(shape) for _ in range(2))
        if self.k is not None:
            k[:, :self.k.shape[1]], v[:, :self.v.shape[1]] = self.k, self.v
        self.k, self.v = k, v


class _Write(torch.autograd.Function):
    """Write a run's keys into a store's columns in place; return its first ``width`` columns.

    The write goes through ``.data``: it must not bump the version of earlier reads' saved
    views, which is exact because every column it fills was masked (not yet written) for them.
    Backward splits the read's gradient into this run's keys and ``prev`` (the earlier keys'
    columns), so every key collects the gradient of each later read."""

    @staticmethod
    def forward(ctx, prev, new, store, rows, cols, width):
        store.data[rows, cols] = new
        ctx.save_for_backward(rows, cols)
        ctx.prev_width = None if prev is None else prev.shape[1]
        return store[:, :width]

    @staticmethod
    def backward(ctx, grad):
        rows, cols = ctx.saved_tensors
        prev = None if ctx.prev_width is None else grad[:, :ctx.prev_width]
        return prev, grad[rows, cols], None, None, None, None


def cache_keys(store: KVStore, prev: tuple[torch.Tensor, torch.Tensor] | None,
               k: torch.Tensor, v: torch.Tensor,
               plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a run's packed keys ``k, v`` [Nq, Hkv, D] (the plan's last Nq keys: a run's
    queries are its own new keys) into ``store``; return the store's view [rows, Lk, Hkv, D]
    of every key so far, carrying autograd history to ``prev`` (the previous view) and ``k``."""
    lay = key_layout(plan)
    n = k.shape[0]
    slots = plan.all_slots() if plan.dense else plan.k_slots
    rows, cols = slots[-n:] // plan.seq, lay.k_column[-n:]
    width = lay.k_index.shape[1]
    store.reserve(k, plan.rows, width)
    pk, pv = (None, None) if prev is None else prev
    return (_Write.apply(pk, k, store.k, rows, cols, width),
            _Write.apply(pv, v, store.v, rows, cols, width))
