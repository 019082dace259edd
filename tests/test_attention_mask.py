"""The flex block mask against the dense 2-D rule, and flex against SDPA.

The rule, written here independently of the code under test: a query slot (row, t_i) sees a
cached key slot (row', t_j) iff row == row', t_j <= t_i, the same document id, and the key
executed. Plans are random: odd lengths, several documents per row, rows halting at different
steps (some after the token pass: zero survivors), compacted, uncompacted (dead keys) and
padded like sequence parallelism's regather (dead padding repeating the last slot).
"""

from __future__ import annotations

import pytest
import torch

from megatron_latentcot.model import attention as attn
from megatron_latentcot.model.attention import (
    AttentionPlan,
    attention,
    block_classes,
    causal_plan,
    flex_block_mask,
    flex_mask_bytes,
    latent_plan,
    row_layout,
)

K = 4


def random_plans(seed: int, rows: int = 3, seq: int = 37, mode: str = "compact",
                 backend: str = "flex") -> list[AttentionPlan]:
    """The token pass and every later step's plan of one random micro-batch."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.cumsum(torch.rand(rows, seq, generator=g) < 0.15, dim=1)
    steps = torch.randint(1, K + 1, (rows, seq), generator=g)
    steps[0] = 1  # row 0 halts after the token pass: no queries at later steps
    steps[1, 3] = K  # the loop reaches K_max
    steps = steps.reshape(-1)
    slots = torch.arange(rows * seq)
    plans = [causal_plan(rows, seq, doc, backend)]
    keys, live = slots, torch.ones(rows * seq, dtype=torch.bool)
    for k in range(2, K + 1):
        alive = steps >= k
        if mode == "uncompact":  # every slot runs, halted ones dead
            q, q_live = slots, alive
        else:
            q, q_live = slots[alive], torch.ones(int(alive.sum()), dtype=torch.bool)
            if mode == "padded" and q.numel():  # three dead slots repeating the last one
                q = torch.cat([q, q[-1:].repeat(3)])
                q_live = torch.cat([q_live, torch.zeros(3, dtype=torch.bool)])
        keys, live = torch.cat([keys, q]), torch.cat([live, q_live])
        plans.append(latent_plan(q, keys, None if mode == "compact" else live, rows, seq, doc,
                                 backend))
    return plans


def dense_rule(plan: AttentionPlan) -> torch.Tensor:
    """[Nq, Nk] visibility of packed queries over packed keys, straight from the definition."""
    q = plan.all_slots() if plan.dense else plan.q_slots
    k = plan.all_slots() if plan.dense else plan.k_slots
    doc = plan.doc_ids if plan.doc_ids is not None else torch.zeros(plan.rows * plan.seq)
    seen = ((q[:, None] // plan.seq == k[None, :] // plan.seq)
            & (k[None, :] % plan.seq <= q[:, None] % plan.seq)
            & (doc[q][:, None] == doc[k][None, :]))
    return seen if plan.k_live is None else seen & plan.k_live[None, :]


def rows_valid(plan: AttentionPlan, lay) -> torch.Tensor:
    """Which layout key slots hold a real cached key (the rest is row padding)."""
    k_n = plan.rows * plan.seq if plan.dense else plan.k_slots.numel()
    valid = torch.zeros_like(lay.k_index, dtype=torch.bool)
    rows = (plan.all_slots() if plan.dense else plan.k_slots) // plan.seq
    counts = torch.bincount(rows, minlength=plan.rows)
    valid[:] = torch.arange(lay.k_index.shape[1])[None, :] < counts[:, None]
    assert torch.equal(torch.sort(lay.k_index[valid]).values, torch.arange(k_n))
    return valid


def expanded(mask, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The BlockMask evaluated pair by pair (full blocks visible, partial ones by mask_mod),
    and its full and partial tiles, each [rows, Lq, Lk]."""
    def tiles(num, idx):
        rows, _, nq, nk = idx.shape
        listed = torch.arange(nk)[None, None, :] < num[:, 0, :, None]
        out = torch.zeros(rows, nq, nk, dtype=torch.bool)
        out.scatter_(2, idx[:, 0].long(), listed)
        return out.repeat_interleave(block, 1).repeat_interleave(block, 2)

    lq, lk = mask.seq_lengths
    b = torch.arange(mask.kv_num_blocks.shape[0])[:, None, None]
    pair = mask.mask_mod(b, 0, torch.arange(lq)[None, :, None], torch.arange(lk)[None, None, :])
    full = tiles(mask.full_kv_num_blocks, mask.full_kv_indices)
    partial = tiles(mask.kv_num_blocks, mask.kv_indices)
    assert not (full & partial).any()
    return full | (partial & pair), full, partial


@pytest.mark.parametrize("block", [4, 16, 128])
@pytest.mark.parametrize("mode", ["compact", "uncompact", "padded"])
@pytest.mark.parametrize("seed", [0, 1])
def test_block_mask_equals_the_rule_block_by_block(seed, mode, block):
    """Every step of random plans: the mask equals the rule pair by pair, full blocks are
    exactly the all-visible tiles, skipped blocks see nothing."""
    for plan in random_plans(seed, mode=mode):
        mask, lay = flex_block_mask(plan, block)
        q_n = plan.rows * plan.seq if plan.dense else plan.q_slots.numel()
        # the layout lists every packed query once, in packed order, and pads rows to blocks
        assert torch.equal(lay.q_index[lay.q_valid], torch.arange(q_n))
        assert lay.q_pos.shape[1] % block == 0 and lay.k_pos.shape[1] % block == 0
        want = dense_rule(plan)[lay.q_index[:, :, None], lay.k_index[:, None, :]]
        want &= lay.q_valid[:, :, None] & rows_valid(plan, lay)[:, None, :]
        got, full, partial = expanded(mask, block)
        assert torch.equal(got, want)  # element by element
        tile = want.unflatten(1, (-1, block)).unflatten(3, (-1, block))  # [B, nq, bq, nk, bk]
        all_seen = tile.all(4).all(2).repeat_interleave(block, 1).repeat_interleave(block, 2)
        none_seen = ~tile.any(4).any(2).repeat_interleave(block, 1).repeat_interleave(block, 2)
        assert torch.equal(full, all_seen)  # full blocks: exactly the all-visible tiles
        assert not (~(full | partial) & ~none_seen).any()  # skipped tiles see nothing
        if plan.dense:  # contiguous queries and keys: the bounds are tight
            assert torch.equal(~(full | partial), none_seen)
        # the query-block lists (backward's) are the transposes of the key-block lists
        from torch.nn.attention.flex_attention import BlockMask

        ref = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices,
                                       mask.full_kv_num_blocks, mask.full_kv_indices)
        for kind in ("q", "full_q"):
            count, index = (getattr(mask, f"{kind}_{f}") for f in ("num_blocks", "indices"))
            want_count, want_index = (getattr(ref, f"{kind}_{f}") for f in ("num_blocks", "indices"))
            listed = torch.arange(index.shape[-1]) < count[..., None]
            assert torch.equal(count, want_count) and torch.equal(index[listed], want_index[listed])
        # memory: integers per block, none per pair
        blocks = lay.q_pos.shape[0] * (lay.q_pos.shape[1] // block) * (lay.k_pos.shape[1] // block)
        assert mask.kv_indices.numel() == mask.full_kv_indices.numel() == blocks


def test_zero_survivor_rows_have_no_blocks():
    plans = random_plans(3)
    for plan in plans[1:]:
        mask, _ = flex_block_mask(plan, 16)
        assert int(mask.kv_num_blocks[0].sum() + mask.full_kv_num_blocks[0].sum()) == 0
    assert int(flex_block_mask(plans[0], 16)[0].kv_num_blocks[0].sum()) > 0


@pytest.mark.parametrize("block,seq", [(16, 37), (16, 48), (128, 37)])
@pytest.mark.parametrize("mode", ["compact", "uncompact", "padded"])
def test_flex_forward_equals_sdpa_on_random_plans(mode, block, seq, monkeypatch):
    """Eager flex with the block mask == SDPA with the dense mask (GQA: 4 query heads over 2);
    seq 48 = 3 blocks of 16: the token pass's rows are views, not copies."""
    monkeypatch.setattr(attn, "BLOCK", block)
    g = torch.Generator().manual_seed(7)
    for plan in random_plans(2, seq=seq, mode=mode):
        nq = plan.rows * plan.seq if plan.dense else plan.q_slots.numel()
        nk = plan.rows * plan.seq if plan.dense else plan.k_slots.numel()
        q = torch.randn(nq, 4, 8, generator=g)
        k, v = torch.randn(nk, 2, 8, generator=g), torch.randn(nk, 2, 8, generator=g)
        flex = attention(q, k, v, plan)
        plan.backend, plan._cache = "sdpa", {}
        sdpa = attention(q, k, v, plan)
        real = torch.ones(nq, dtype=torch.bool)
        if mode == "padded" and not plan.dense:
            real = ~torch.cat([torch.zeros(nq - 3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)])
        torch.testing.assert_close(flex[real], sdpa[real], rtol=1e-5, atol=1e-6)


def test_sdpa_mask_is_the_rule():
    """The SDPA path's dense mask (built from the same row layout) is the definition too."""
    for plan in random_plans(4, mode="uncompact", backend="sdpa")[1:]:
        lay = row_layout(plan)
        want = dense_rule(plan)[lay.q_index[:, :, None], lay.k_index[:, None, :]]
        want &= lay.q_valid[:, :, None] & rows_valid(plan, lay)[:, None, :]
        assert torch.equal(lay.mask(), want)


@pytest.mark.parametrize("block", [16, 128])
def test_mask_memory_is_integers_per_block(block):
    """What a block mask keeps is exactly ``flex_mask_bytes`` (the planner's term): a few
    integers per query / key slot and per block pair; the classification's transient holds
    booleans per block pair: (T*K/block)^2 per row, not (T*K)^2."""
    for plan in random_plans(5, rows=2, seq=301):
        mask, lay = flex_block_mask(plan, block)
        held = [t for t in (*mask.as_tuple()[2:], *vars(lay).values()) if torch.is_tensor(t)]
        kept = sum(t.numel() * t.element_size() for t in held)
        assert kept == flex_mask_bytes(2, lay.q_pos.shape[1], lay.k_pos.shape[1], block,
                                       keys=lay.k_column.numel())
        partial, full = block_classes(lay, block)
        assert partial.shape == (2, lay.q_pos.shape[1] // block, lay.k_pos.shape[1] // block)


@pytest.fixture(scope="module")
def ctx():
    from megatron_latentcot.config import ParallelConfig
    from megatron_latentcot.parallel import init_distributed

    return init_distributed(ParallelConfig())


@pytest.mark.parametrize("method,extra", [
    ("vanilla", []), ("adaptive", []), ("adaptive", ["latent.compact=false"]),
    ("latent_fixed", []), ("looped", []), ("pondering", []), ("pause", [])],
    ids=["vanilla", "adaptive", "adaptive-masked", "latent_fixed", "looped", "pondering", "pause"])
def test_flex_model_forward_equals_sdpa_for_every_method(ctx, method, extra):
    """The whole model's forward, several documents per row: flex == SDPA in float32."""
    from tests.test_latent_scheduler import batch, build

    mb = batch(docs=True)
    mb["doc_ids"] = torch.cumsum(torch.rand(3, 12, generator=torch.Generator().manual_seed(1))
                                 < 0.25, dim=1)
    outs = []
    for backend in ("sdpa", "flex"):
        _, _, sched = build(ctx, [f"latent.method={method}", "latent.tau=0.3", "latent.max_steps=3",
                                  "model.max_position_embeddings=64",
                                  f"latent.attention_backend={backend}", *extra],
                            dtype=torch.float32)
        with torch.no_grad():
            outs.append(sched.forward(mb))
    assert torch.equal(outs[0].steps, outs[1].steps)
    if method == "adaptive":
        assert len({r.live for r in outs[0].records}) > 1  # pruning happened
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)


def test_compiled_flex_graphs_stay_bounded_over_an_adaptive_run(ctx, monkeypatch):
    """Compiled flex over 12 adaptive iterations whose survivor counts (hence bucketed widths)
    vary from iteration to iteration: at most 4 graphs in all (step 1's contiguous keys; the
    first read of the in-place K/V cache, whose rows are strided by its capacity; one recompile
    making the key width dynamic and one the query width), whatever the run's length (30
    iterations with six thresholds: 4). A new plan's mask_mod is a new closure each step: it
    must not recompile."""
    from torch._dynamo.utils import counters

    from tests.test_latent_scheduler import batch, build

    torch._dynamo.reset()
    monkeypatch.setattr(attn, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(attn, "_compiled_flex", None)
    seq = 300
    cfg, _, sched = build(ctx, ["latent.method=adaptive", "latent.max_steps=4",
                                f"data.seq_length={seq}", f"model.max_position_embeddings={seq}",
                                "latent.attention_backend=flex"], dtype=torch.float32)
    widths = set()
    real = attn.flex_block_mask

    def spy(plan, block):
        mask, lay = real(plan, block)
        widths.add(mask.seq_lengths)
        return mask, lay

    monkeypatch.setattr(attn, "flex_block_mask", spy)
    start = counters["stats"]["unique_graphs"]
    for it in range(12):
        cfg.latent.tau = (0.05, 0.3, 0.45, 0.2)[it % 4]
        with torch.no_grad():
            sched.forward(batch(rows=2, seq=seq, seed=it, docs=True))
    assert len(widths) >= 5, widths  # the widths did vary
    assert counters["stats"]["unique_graphs"] - start <= 4
