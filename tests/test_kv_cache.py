"""The latent loop's K/V cache, written in place (model.attention.KVStore): later steps read
one preallocated store per layer instead of concatenating and regathering earlier steps' keys,
and the autograd routing of those in-place writes gives the concatenation's gradients."""

from __future__ import annotations

import pytest
import torch

from megatron_latentcot.model import attention as attn
from megatron_latentcot.model import llama


@pytest.fixture(scope="module")
def ctx():
    from megatron_latentcot.config import ParallelConfig
    from megatron_latentcot.parallel import init_distributed

    return init_distributed(ParallelConfig())


def _random_run(backend: str, seed: int):
    """A dense first run over a [rows, seq] grid, then a run of a random subset of its slots
    (some rows empty) over the first run's keys and its own, with documents and dead keys."""
    g = torch.Generator().manual_seed(seed)
    rows, seq, hq, hkv, d = 3, 37, 4, 2, 8
    doc = torch.cumsum(torch.rand(rows, seq, generator=g) < 0.1, dim=1)
    first = attn.causal_plan(rows, seq, doc, backend)
    q2 = torch.nonzero(torch.rand(rows * seq, generator=g) < 0.4).squeeze(1)
    q2 = q2[q2 // seq != 1]  # row 1 runs nothing in step 2
    live = torch.ones(rows * seq + q2.numel(), dtype=torch.bool)
    live[torch.randperm(live.numel(), generator=g)[:5]] = False  # dead keys
    second = attn.latent_plan(q2, torch.cat([first.all_slots(), q2]), live, rows, seq, doc,
                              backend)
    tensors = [torch.randn(n, h, d, generator=g, dtype=torch.float64, requires_grad=True)
               for n in (rows * seq, q2.numel()) for h in (hq, hkv, hkv)]
    return first, second, tensors


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_place_cache_equals_concatenation(backend, seed):
    """Outputs and every gradient (queries, and both runs' keys and values) of two runs
    attending through the store equal attention over the concatenated packed keys (flex:
    outputs only, it has no backward on CPU)."""
    first, second, (q1, k1, v1, q2, k2, v2) = _random_run(backend, seed)

    def through_store():
        store = attn.KVStore(attn.cache_capacity(2 * first.seq, backend))
        views = attn.cache_keys(store, None, k1, v1, first)
        out1 = attn.attention(q1, k1, v1, first)
        keys, values = attn.cache_keys(store, views, k2, v2, second)
        assert keys.dim() == 4 and keys.untyped_storage().data_ptr() == \
            store.k.untyped_storage().data_ptr()  # read in place
        return out1, attn.attention(q2, keys, values, second)

    def concatenated():
        return (attn.attention(q1, k1, v1, first),
                attn.attention(q2, torch.cat([k1, k2]), torch.cat([v1, v2]), second))

    grads = []
    for run in (through_store, concatenated):
        with torch.set_grad_enabled(backend == "sdpa"):
            out1, out2 = run()
        weight = torch.linspace(-1, 1, out2.numel(), dtype=torch.float64).view_as(out2)
        loss = out1.pow(2).sum() + (out2 * weight).sum()
        grads.append((out1, out2, torch.autograd.grad(loss, [q1, k1, v1, q2, k2, v2])
                      if backend == "sdpa" else ()))
    (a1, a2, ga), (b1, b2, gb) = grads
    torch.testing.assert_close(a1, b1, rtol=0, atol=1e-12)
    torch.testing.assert_close(a2, b2, rtol=0, atol=1e-12)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("extra", [
    ["latent.method=latent_fixed"],
    ["latent.method=adaptive", "latent.tau=0.3"],
    ["latent.method=adaptive", "latent.tau=0.3", "latent.compact=false"],
], ids=["latent_fixed", "adaptive", "adaptive-masked"])
def test_training_steps_read_one_store_per_layer(ctx, monkeypatch, extra):
    """In a training forward every later step of a layer reads its keys from the same
    preallocated store, sized for every (t, k) slot: K x seq columns per row, once."""
    from tests.test_latent_scheduler import batch, build

    cfg, model, sched = build(ctx, extra + ["latent.max_steps=4"], dtype=torch.float32)
    reads = []
    real = llama.attention
    monkeypatch.setattr(llama, "attention", lambda q, k, v, plan: reads.append(
        (plan.dense, k)) or real(q, k, v, plan))
    mb = batch(rows=3, seq=12, docs=True)
    out = sched.forward(mb)
    layers = cfg.model.num_layers
    assert len(reads) == layers * len(out.records) and len(out.records) > 2
    later = [k for dense, k in reads if not dense]
    assert all(k.dim() == 4 for k in later)
    stores = {k.untyped_storage().data_ptr(): k.untyped_storage().nbytes() for k in later}
    assert len(stores) == layers
    m = cfg.model
    per_row = cfg.latent.max_steps * mb["tokens"].shape[1]
    assert set(stores.values()) == {3 * per_row * m.kv_heads * m.head_dim * 4}
    out.loss.backward()  # the in-place writes leave every saved view valid for backward


def test_decoder_store_grows_geometrically(ctx):
    """A decoder's store has no known final size: it doubles when full, so decoding n tokens
    one at a time reallocates O(log n) times, and keeps every earlier key."""
    from megatron_latentcot.inference.decoder import IncrementalDecoder
    from tests.test_latent_scheduler import build

    cfg, model, sched = build(ctx, ["latent.method=adaptive", "latent.max_steps=3"],
                              dtype=torch.float32)
    decoder = IncrementalDecoder(model, cfg, sched)
    decoder.reset(2)
    tokens = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    widths = []
    for t in range(tokens.shape[1]):
        decoder.extend([tokens[0, t:t + 1], tokens[1, t:t + 1]])
        store = decoder.streams[0].kv[0][0]
        widths.append(store.k.shape[1])
    assert len(set(widths)) <= 7, widths  # 40 tokens x up to 3 steps: <= 120 columns
    assert widths == sorted(widths)


def _sp_store_allocations() -> list[int]:
    """TP2 with sequence parallelism, K = 2: every token goes on except one of TP rank 0's, so
    the 15 survivors are padded to 16 and the padding query joins the last row, whose 8 step-1
    and 8 step-2 keys already fill K x seq columns. Returns each store's allocations."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.model.router import Decision
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from tests.test_latent_scheduler import BASE, batch, build

    overrides = ["latent.method=adaptive", "latent.max_steps=2", "train.micro_batch_size=2",
                 "train.global_batch_size=2", "parallel.tensor_model_parallel_size=2",
                 "parallel.sequence_parallel=true"]
    ctx = init_distributed(load_config(None, BASE + overrides).parallel)
    cfg, model, sched = build(ctx, overrides)
    original = sched._decide

    def decide(z, reach, k):
        d, g = original(z, reach, k)
        if k > 1:
            return d, g
        keep = torch.ones(reach.numel(), dtype=torch.bool)
        keep[0] = ctx.tp_rank != 0
        return Decision(torch.where(keep, d.exit.new_zeros(()), reach), reach * 0.9 * keep,
                        keep), g

    sched._decide = decide
    allocations: dict[int, int] = {}
    reserve = attn.KVStore.reserve

    def counting(self, like, rows, width):
        before = self.k
        reserve(self, like, rows, width)
        if self.k is not before:
            allocations[id(self)] = allocations.get(id(self), 0) + 1

    attn.KVStore.reserve = counting
    out = sched.forward(batch(rows=2, seq=8))
    out.loss.backward()
    destroy_distributed()
    assert [r.live for r in out.records] == [16, 15]
    return list(allocations.values())


def test_sequence_parallel_padding_fits_the_store():
    """The store's columns count the padding queries sequence parallelism adds to one row, so
    no store is reallocated (a reallocation keeps the old store alive through saved views)."""
    from tests.dist_utils import run_distributed

    for counts in run_distributed(_sp_store_allocations, 2):
        assert counts and set(counts) == {1}, counts
