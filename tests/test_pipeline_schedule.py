"""Pipeline schedules (training/schedules.py): deadlock-free, consistent at both ends of every
link, bounded in memory, and really bounded when run (live saved tensors counted per stage).

The equivalence of the schedules with one process is tests/test_latent_pipeline.py and
tests/test_parallel_equivalence.py (PP cases, M = 4 > PP = 2, default schedule 1f1b).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_latentcot.training import schedules as S
from tests.dist_utils import run_distributed
from tests.test_parallel_equivalence import TINY, VOCAB, global_batches, rank_microbatches

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("schedule", S.SCHEDULES)
def test_every_schedule_runs_to_the_end_in_order(schedule):
    """Data-flow simulation (sends never block, receives wait) finishes for every shape,
    partial last groups included, and each link lists its messages alike at both ends."""
    for pp in (2, 3, 4):
        for steps in (1, 2, 3, 4):
            for micro in (1, 2, 3, 5, 8, 9):
                S.simulate(schedule, pp, steps, micro)
                S.check_links(schedule, pp, steps, micro)
                ops = [S.stage_ops(schedule, pp, steps, micro, s) for s in range(pp)]
                units = {(m, k) for m in range(micro) for k in range(1, steps + 1)}
                for stage_ops in ops:  # every unit forward once, backward once
                    assert sorted(stage_ops) == sorted([("F", *u) for u in units]
                                                       + [("B", *u) for u in units])


def test_a_reordered_link_is_caught():
    """check_links is not vacuous: swap two forwards on one stage only."""
    original = S.stage_ops

    def swapped(schedule, pp, steps, micro, stage, forward_only=False):
        ops = original(schedule, pp, steps, micro, stage, forward_only)
        if stage == 1:
            ops[0], ops[1] = ops[1], ops[0]
        return ops

    S.stage_ops = swapped
    try:
        with pytest.raises(S.Deadlock):
            S.check_links("gpipe", 2, 1, 3)
    finally:
        S.stage_ops = original


@pytest.mark.parametrize("pp,steps", [(2, 1), (4, 1), (2, 3), (4, 4)])
def test_1f1b_holds_a_bounded_set_of_units(pp, steps):
    """1F1B: at most K PP - s units alive on stage s (PP - s micro-batches for one-pass models),
    spread over at most 2 PP micro-batches, for any M; GPipe holds all K M."""
    for micro in (pp, 2 * pp, 4 * pp, 16):
        for s in range(pp):
            units, mbs = S.peak_live("1f1b", pp, steps, micro, s)
            assert units == steps * pp - s
            assert mbs <= (pp - s if steps == 1 else 2 * pp)
            assert S.peak_live("gpipe", pp, steps, micro, s) == (steps * micro, micro)


def test_bubble_of_1f1b_is_gpipes():
    """(PP - 1) / (M + PP - 1) for one-pass models (backward = 2 forwards); the latent ring's is
    (PP - 1) / (K M + PP - 1): 1F1B saves memory, not idle time."""
    for pp, steps, micro in ((2, 1, 4), (4, 1, 8), (2, 3, 8), (4, 4, 16)):
        one = S.simulate("1f1b", pp, steps, micro).bubble()
        assert one == pytest.approx(S.simulate("gpipe", pp, steps, micro).bubble())
        assert one == pytest.approx((pp - 1) / (steps * micro + pp - 1))


def test_readme_shows_the_schedule_tables():
    readme = (REPO / "README.md").read_text()
    assert S.table("1f1b", 2, 1, 4) in readme
    assert S.table("1f1b", 2, 2, 4) in readme


# -- the real pipeline: live micro-batches per stage --------------------------------------------

def live_per_stage(methods: dict[str, list[str]], micro: int) -> dict:
    """Per method and schedule: this stage's peak live units, micro-batches and saved bytes over
    one forward-backward of ``micro`` micro-batches (one row each), and the planner's figures."""
    from benchmarks.pipeline import LiveSaves, tag_units
    from megatron_latentcot import plan as P
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training.loop import Engine

    live: list[LiveSaves | None] = [None]
    tag_units(lambda: live[0])
    out, ctx = {}, None
    for name, overrides in methods.items():
        for schedule in S.SCHEDULES:
            cfg = load_config(None, TINY + overrides + [
                "parallel.pipeline_model_parallel_size=2", "train.micro_batch_size=1",
                f"train.global_batch_size={micro}", f"parallel.pipeline_schedule={schedule}"])
            ctx = ctx or init_distributed(cfg.parallel)
            engine = Engine(cfg, ctx, VOCAB)
            mbs = rank_microbatches(global_batches(1, micro, cfg.data.seq_length)[0], 1, 0, 1)
            live[0] = LiveSaves({p.untyped_storage().data_ptr() for p in engine.model.parameters()})
            with live[0].hooks():
                engine.run(mbs, forward_only=False)
            saved, live[0] = live[0], None
            plan = P.stage_memory(cfg, VOCAB, P.make_layout(cfg), ctx.pp_rank)
            acts = next(v for k, v in plan.terms.items() if k.startswith("activations"))
            out[name, schedule] = {"units": saved.peak_units, "mbs": saved.peak_mbs,
                                   "bytes": saved.peak_bytes, "planned": acts}
    destroy_distributed()
    return out


def test_live_micro_batches_per_stage_are_bounded_by_the_pipeline_depth():
    """PP2, M = 6 micro-batches: 1F1B keeps at most PP - s one-pass micro-batches alive on
    stage s, and the latent loop (adaptive, K = 3) at most 2 PP micro-batches with K PP - s
    units; GPipe keeps all 6 (so the count can fail). The planner's activation figure for each
    stage and schedule is within 15% of the live saved bytes measured."""
    micro, steps = 6, 3
    methods = {"vanilla": [],
               "adaptive": ["latent.method=adaptive", "latent.tau=0.0", f"latent.max_steps={steps}",
                            "model.embedding_multiplier=null"]}
    for stage, res in enumerate(run_distributed(live_per_stage, 2, methods, micro, timeout=240)):
        assert res["vanilla", "1f1b"]["mbs"] == 2 - stage
        assert res["vanilla", "gpipe"]["mbs"] == micro
        assert res["adaptive", "1f1b"]["mbs"] <= 4
        assert res["adaptive", "1f1b"]["units"] <= steps * 2 - stage
        assert res["adaptive", "gpipe"]["mbs"] == micro
        for key, r in res.items():
            assert r["planned"] == pytest.approx(r["bytes"], rel=0.15), (stage, key, r)
