"""Sharded initialisation: a rank draws only its slice, and any split gives the same weights.

The layout-independence end to end (TP / PP / DP checkpoints gathered equal one process) is
tests/test_export.py::test_four_rank_checkpoints_are_gathered; here the pieces it rests on.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_latentcot.model import llama
from megatron_latentcot.model.llama import INIT_BLOCK, init_slice_
from tests.dist_utils import run_distributed

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.vocab_size=640",
        "latent.method=adaptive", "latent.router_bias_init=1.5"]


def _slice(shape: tuple[int, int], dim: int, start: int, length: int) -> tuple[torch.Tensor, int]:
    out_shape = list(shape)
    out_shape[dim] = length
    out = torch.empty(out_shape)
    drawn = init_slice_(out, "layers.0.w", shape, dim, start, 0.02, seed=7)
    return out, drawn


@pytest.mark.parametrize("dim", [0, 1])
def test_any_split_assembles_the_same_full_weight(dim):
    """Slices at arbitrary cuts (inside blocks, on block edges, ragged ends) concatenate to the
    weight drawn whole; each slice draws at most two blocks beyond itself."""
    n = 2 * INIT_BLOCK + 37
    shape = (n, 24) if dim == 0 else (24, n)
    full, drawn = _slice(shape, dim, 0, n)
    assert drawn == full.numel()
    for cuts in ([0, n], [0, n // 2, n], [0, 5, INIT_BLOCK, INIT_BLOCK + 1, n - 3, n],
                 [0, *range(INIT_BLOCK // 2, n, INIT_BLOCK // 2), n]):
        parts = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            part, drawn = _slice(shape, dim, a, b - a)
            assert drawn <= part.numel() + 2 * INIT_BLOCK * 24
            parts.append(part)
        assert torch.equal(torch.cat(parts, dim=dim), full), cuts
    other, _ = _slice(shape, dim, 0, n)
    assert torch.equal(other, full)  # deterministic
    out = torch.empty(shape)
    init_slice_(out, "layers.0.v", shape, dim, 0, 0.02, seed=7)
    assert not torch.equal(out, full)  # another weight, other values


def test_values_are_the_documented_truncated_normal():
    """N(0, std^2) cut at +-2 std (METHOD.md): the truncated normal's std is 0.8796 std."""
    std = 0.05
    x, _ = _slice((4 * INIT_BLOCK, 512), 0, 0, 4 * INIT_BLOCK)
    x = x * (std / 0.02)
    assert x.abs().max() <= 2 * std
    assert x.abs().max() > 1.99 * std  # the tails are reached, not clipped short
    assert abs(x.mean().item()) < 0.005 * std
    truncated_std = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))
    assert x.std().item() == pytest.approx(std * truncated_std, rel=0.01)
    assert (x.abs() > std).float().mean().item() == pytest.approx(
        (math.erf(2 / math.sqrt(2)) - math.erf(1 / math.sqrt(2))) / math.erf(2 / math.sqrt(2)),
        abs=0.005)


def test_meta_build_materialises_only_this_rank_with_constructor_values(monkeypatch):
    """No parameter is left on the meta device; norms, router and rotary frequencies have
    their constructor values; megatron's TP attributes survive; init_weights draws each
    logical weight once (world of one: exactly the model's non-norm elements)."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.inference.loading import world_of_one
    from megatron_latentcot.model.llama import LlamaStage, init_weights

    cfg = load_config(None, TINY)
    model = LlamaStage(cfg, world_of_one(), 640)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model.layers["0"].input_layernorm.weight, torch.ones(64))
    assert torch.equal(model.router.bias, torch.tensor([1.5]))
    assert torch.equal(model.router.weight, torch.zeros(1, 64))
    inv = cfg.model.rope_theta ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.equal(model.rotary.inv_freq, inv)
    w = model.layers["0"].self_attn.o_proj.weight
    assert w.tensor_model_parallel and w.partition_dim == 1
    assert model.layers["0"].mlp.gate_up_proj.weight.partition_dim == 0

    drawn = []
    real = llama.trunc_normal
    monkeypatch.setattr(llama, "trunc_normal",
                        lambda shape, std, gen: drawn.append(math.prod(shape)) or real(shape, std, gen))
    init_weights(model, cfg.model, seed=3)
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    assert sum(drawn) == sum(p.numel() for p in model.parameters()) - norms - 1  # router bias
    assert torch.equal(model.router.bias, torch.tensor([1.5]))


def _shards_and_draws(block: int) -> list[dict]:
    """In one process, on a fake process group: TP=1, then each rank of TP=2 (block size
    ``block`` so that the tiny model's shards are whole blocks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from benchmarks.init import fake_tensor_parallel_rank
    from megatron_latentcot.config import load_config
    from megatron_latentcot.model.llama import LlamaStage, init_weights, logical_parameters

    out = []
    real = llama.trunc_normal
    llama.INIT_BLOCK = block
    for tp, rank in ((1, 0), (2, 0), (2, 1)):
        cfg = load_config(None, TINY + [f"parallel.tensor_model_parallel_size={tp}"])
        model = LlamaStage(cfg, fake_tensor_parallel_rank(tp, rank), 640)
        drawn = []
        llama.trunc_normal = lambda shape, std, gen, drawn=drawn: drawn.append(
            math.prod(shape)) or real(shape, std, gen)
        try:
            init_weights(model, cfg.model, seed=3)
        finally:
            llama.trunc_normal = real
        out.append({"tp": tp, "rank": rank, "drawn": sum(drawn),
                    "local": sum(p.numel() for p in model.parameters()),
                    "shards": {name: lp.local.clone() for name, lp in logical_parameters(model)}})
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return out


def test_tp2_ranks_draw_their_shards_of_the_single_process_weights():
    """Each TP=2 rank draws its own shard (and the replicated weights), not the model, and
    the shards put together are the weights one process draws."""
    single, *ranks = run_distributed(_shards_and_draws, 1, 8)[0]
    total = single["local"]
    for r in ranks:
        assert r["drawn"] < 0.6 * total, (r["drawn"], total)  # the shard, not the model
        assert r["drawn"] <= r["local"]
    for name, want in single["shards"].items():
        pieces = [r["shards"][name] for r in ranks]
        if pieces[0].shape == want.shape:
            got = pieces[0]  # replicated over TP
            assert torch.equal(pieces[1], want), name
        else:
            dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
            got = torch.cat(pieces, dim=dim)
        assert torch.equal(got, want), name
