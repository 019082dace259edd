"""The latent loop through pipeline stages trains exactly like one process.

Each layout runs 3 optimizer steps on the same global batches as a single process (clipping set
low enough to fire) and must give the same losses, gradient norms and latent-step statistics.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.test_parallel_equivalence import TINY, global_batches, rank_microbatches

VOCAB = 128
ADAPTIVE = ["latent.method=adaptive", "latent.tau=0.3", "latent.max_steps=3",
            "model.embedding_multiplier=null"]
LOOPED = ["latent.method=looped", "latent.max_steps=3"]
FIXED = ["latent.method=latent_fixed", "latent.max_steps=3", "model.embedding_multiplier=null"]
PP2 = ["parallel.pipeline_model_parallel_size=2"]
HALTING_ROWS = (0, 1, 4, 5)  # micro-batches 0 and 2 of a rank's four: every token halts at step 1


def _halt_patch() -> None:
    """Micro-batches made only of token 0 halt all their tokens at step 1; the rest go on.

    The router still runs on them (as it does when its gates all fall below tau), but no
    gradient reaches it through their halting. The flag is set whenever the method's generator
    resumes, so it follows the pipeline's interleaving of micro-batches.
    """
    from megatron_latentcot.model import latent
    from megatron_latentcot.model.router import decide as route_step

    steps, decide = latent.LatentStepScheduler.steps, latent.LatentStepScheduler._decide

    def patched_steps(self, mb):
        halt = bool((mb["tokens"] == 0).all())
        inner = steps(self, mb)
        self.halt = halt
        request = next(inner)
        while True:
            h = yield request
            self.halt = halt
            try:
                request = inner.send(h)
            except StopIteration as done:
                return done.value

    def patched_decide(self, z, reach, k):
        if self.halt:  # no threshold is met: everyone exits
            return route_step(reach, z, k, self.max_steps, self.cfg.latent.method,
                              getattr(self.stage, "router", None), math.inf)
        return decide(self, z, reach, k)

    latent.LatentStepScheduler.steps = patched_steps
    latent.LatentStepScheduler._decide = patched_decide


def train_three_steps(overrides: list[str], halting_rows: tuple[int, ...] = ()) -> dict:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training.loop import Engine

    if halting_rows:
        _halt_patch()
    cfg = load_config(None, TINY + overrides)
    ctx = init_distributed(cfg.parallel)
    engine = Engine(cfg, ctx, VOCAB)
    out = []
    for batch in global_batches(3, cfg.train.global_batch_size, cfg.data.seq_length):
        if halting_rows:
            batch[list(halting_rows)] = 0
        out.append(engine.train_step(rank_microbatches(batch, cfg.train.micro_batch_size,
                                                       ctx.dp_rank, ctx.dp_size)))
    valid = engine.eval_loss(rank_microbatches(global_batches(1, 8, cfg.data.seq_length, seed=1)[0],
                                               cfg.train.micro_batch_size, ctx.dp_rank, ctx.dp_size))
    result = {"metrics": out, "valid": valid, "last_stage": ctx.is_last_stage,
              "opt_numel": engine.optimizer.local_state_numel()}
    destroy_distributed()
    return result


def _check(results: list[dict], single: dict, stats: tuple[str, ...] = ()) -> None:
    ref = single["metrics"]
    for r in results:
        torch.testing.assert_close([m["grad_norm"] for m in r["metrics"]],
                                   [m["grad_norm"] for m in ref], rtol=2e-5, atol=0)
        for key in ("lm_loss", "flops") + stats:
            torch.testing.assert_close([m[key] for m in r["metrics"]], [m[key] for m in ref],
                                       rtol=2e-5, atol=0, msg=key)
        if r["last_stage"]:
            torch.testing.assert_close(r["valid"], single["valid"], rtol=2e-5, atol=0)
    assert ref[0]["grad_norm"] > 0.05  # the clip fired


STEP_STATS = ("mean_steps", "active_frac_step2", "active_frac_step3")


@pytest.fixture(scope="module")
def single_adaptive():
    return run_distributed(train_three_steps, 1, ADAPTIVE)[0]


def test_adaptive_pp2_equals_one_process(single_adaptive):
    ref = single_adaptive["metrics"]
    assert 1.0 < ref[0]["mean_steps"] < 3.0  # the router prunes: a real, shrinking active set
    assert 0 < ref[0]["active_frac_step3"] < ref[0]["active_frac_step2"] < 1
    _check(run_distributed(train_three_steps, 2, ADAPTIVE + PP2), single_adaptive,
           STEP_STATS + ("adaptive_loss", "gate_mean"))


@pytest.mark.slow
def test_looped_pp2_equals_one_process():
    single = run_distributed(train_three_steps, 1, LOOPED)[0]
    _check(run_distributed(train_three_steps, 2, LOOPED + PP2), single)


def test_pp2_micro_batches_halting_early_do_not_deadlock():
    """Micro-batches 0 and 2 stop after step 1 while 1 and 3 go on to step 3."""
    single = run_distributed(train_three_steps, 1, ADAPTIVE, HALTING_ROWS)[0]
    assert single["metrics"][0]["active_frac_step2"] < 0.55  # half of the tokens stopped
    _check(run_distributed(train_three_steps, 2, ADAPTIVE + PP2, HALTING_ROWS, timeout=240),
           single, STEP_STATS)


def test_dp2_fsdp2_ranks_running_different_step_counts():
    """Every token of data-parallel rank 0 halts at step 1 (its blocks run once per
    micro-batch, its router gets no gradient) while rank 1's go on to step 3: FSDP2 must issue
    the same collectives on both and the result must equal one process."""
    rank0_rows = (0, 1, 2, 3)
    single = run_distributed(train_three_steps, 1, ADAPTIVE, rank0_rows)[0]
    assert 0 < single["metrics"][0]["active_frac_step3"] < 0.5
    results = run_distributed(train_three_steps, 2, ADAPTIVE + ["parallel.zero=fsdp2"],
                              rank0_rows, timeout=240)
    _check(results, single, STEP_STATS + ("adaptive_loss", "gate_mean"))


@pytest.mark.slow
def test_adaptive_pp2_dp2_fsdp2_equals_one_process(single_adaptive):
    """FSDP2 under the pipelined latent loop: many backward calls per stage, gradients reduced
    in the last; each rank holds half of its stage's optimizer state."""
    results = run_distributed(train_three_steps, 4, ADAPTIVE + PP2 + ["parallel.zero=fsdp2"])
    _check(results, single_adaptive, STEP_STATS)
    unsharded = run_distributed(train_three_steps, 2, ADAPTIVE + PP2)
    for r in results:
        stage_full = next(u["opt_numel"] for u in unsharded if u["last_stage"] == r["last_stage"])
        assert abs(r["opt_numel"] - stage_full / 2) <= 0.02 * stage_full


@pytest.mark.slow
@pytest.mark.parametrize("method", [ADAPTIVE, LOOPED, FIXED], ids=["adaptive", "looped", "fixed"])
def test_pp2_tp2_equals_one_process(method):
    single = run_distributed(train_three_steps, 1, method)[0]
    _check(run_distributed(train_three_steps, 4, method + PP2 + [
        "parallel.tensor_model_parallel_size=2"]), single)


@pytest.mark.slow
def test_latent_fixed_pp2_uneven_equals_one_process():
    single = run_distributed(train_three_steps, 1, FIXED)[0]
    _check(run_distributed(train_three_steps, 2, FIXED + PP2 + ["parallel.pipeline_layers=[1,3]"]),
           single)
