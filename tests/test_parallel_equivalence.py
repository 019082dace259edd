"""TP / PP / DP / SP layouts train exactly like one process (same global batch, 3 steps).

Clipping is set low enough to fire, so the global gradient norm must be right on every layout.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

VOCAB = 128
TINY = ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}",
        "data.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.clip_grad=0.05", "train.lr=1e-2", "train.min_lr=1e-3", "train.train_iters=3",
        "train.lr_warmup_iters=1"]


def global_batches(steps: int, gbs: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (gbs, seq + 1), generator=g) for _ in range(steps)]


def rank_microbatches(batch: torch.Tensor, mbs: int, dp_rank: int, dp_size: int) -> list[dict]:
    """This rank's share of the global batch, as micro-batches."""
    share = batch.chunk(dp_size)[dp_rank]
    return [{"tokens": s[:, :-1].contiguous(), "labels": s[:, 1:].contiguous(),
             "loss_mask": torch.ones(s.shape[0], s.shape[1] - 1)} for s in share.split(mbs)]


def train_three_steps(overrides: list[str]) -> dict:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training.loop import Engine

    cfg = load_config(None, TINY + overrides)
    ctx = init_distributed(cfg.parallel)
    engine = Engine(cfg, ctx, VOCAB)
    losses, norms = [], []
    for batch in global_batches(3, cfg.train.global_batch_size, cfg.data.seq_length):
        out = engine.train_step(rank_microbatches(batch, cfg.train.micro_batch_size,
                                                  ctx.dp_rank, ctx.dp_size))
        losses.append(out["lm_loss"])
        norms.append(out["grad_norm"])
    result = {"losses": losses, "norms": norms, "last_stage": ctx.is_last_stage,
              "opt_numel": engine.optimizer.local_state_numel(),
              "params": sum(p.numel() for p in engine.model.parameters())}
    destroy_distributed()
    return result


ADAPTIVE = ["latent.method=adaptive", "latent.tau=0.3", "latent.max_steps=3",
            "model.embedding_multiplier=null"]


@pytest.fixture(scope="module")
def single():
    return run_distributed(train_three_steps, 1, [])[0]


@pytest.fixture(scope="module")
def single_adaptive():
    return run_distributed(train_three_steps, 1, ADAPTIVE)[0]


def test_adaptive_dp2_zero_equals_one_process(single_adaptive):
    """FSDP2 under the latent loop: blocks reused K times per forward, one reduction."""
    _check(run_distributed(train_three_steps, 2, ADAPTIVE + ["parallel.zero=fsdp2"]),
           single_adaptive)


@pytest.mark.slow
def test_adaptive_tp2_dp2_equals_one_process(single_adaptive):
    _check(run_distributed(train_three_steps, 4, ADAPTIVE + [
        "parallel.tensor_model_parallel_size=2"]), single_adaptive)


def _check(results: list[dict], single: dict) -> None:
    for r in results:
        torch.testing.assert_close(r["norms"], single["norms"], rtol=2e-5, atol=0)
        if r["last_stage"]:
            torch.testing.assert_close(r["losses"], single["losses"], rtol=2e-5, atol=0)
    assert single["norms"][0] > 0.05  # the clip fired


def test_single_process_learns(single):
    assert single["losses"][-1] < single["losses"][0]


@pytest.mark.parametrize("layout", [
    pytest.param(["parallel.tensor_model_parallel_size=2"], id="tp2"),
    pytest.param(["parallel.pipeline_model_parallel_size=2"], id="pp2"),
    pytest.param(["parallel.zero=fsdp2"], id="dp2-zero"),
])
def test_two_process_layouts_equal_one(single, layout):
    _check(run_distributed(train_three_steps, 2, layout), single)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    pytest.param(["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
                 id="tp2-sp"),
    pytest.param(["parallel.zero=none"], id="dp2-no-zero"),
    pytest.param(["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layers=[1,3]"],
                 id="pp2-uneven"),
])
def test_more_two_process_layouts(single, layout):
    _check(run_distributed(train_three_steps, 2, layout), single)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    pytest.param(["parallel.tensor_model_parallel_size=2",
                  "parallel.pipeline_model_parallel_size=2"], id="tp2xpp2"),
    pytest.param(["parallel.tensor_model_parallel_size=2"], id="tp2xdp2"),
])
def test_four_process_layouts_equal_one(single, layout):
    _check(run_distributed(train_three_steps, 4, layout), single)


def test_zero_shards_optimizer_state(single):
    """Each DP rank holds ~1/DP of the AdamW state (exp_avg + exp_avg_sq = 2 x params)."""
    sharded = run_distributed(train_three_steps, 2, ["parallel.zero=fsdp2"])
    full = single["opt_numel"]
    assert full == 2 * single["params"]
    for r in sharded:
        assert abs(r["opt_numel"] - full / 2) <= 0.02 * full, (r["opt_numel"], full)


def test_activation_recompute_changes_nothing(single):
    _check(run_distributed(train_three_steps, 1, ["train.recompute=true"]), single)
