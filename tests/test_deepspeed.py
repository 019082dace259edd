"""DeepSpeed ZeRO-1/2 (``parallel.zero: deepspeed``) trains exactly like one process, resumes
bit-exactly in new processes, and every combination that is not exact is refused with one line.

Equivalence: DP2 and TP2xDP2, vanilla and adaptive (and bf16 adaptive at DP2), 3 optimizer
steps of 2 accumulated micro-batches per rank, clipping low enough to fire; in the adaptive
runs the two data-parallel ranks' tokens halt after different step counts (asserted). The
reference is one process without DeepSpeed (our own AdamW, clip and norm). Needs the
``deepspeed`` extra.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import test_reshard_resume
from tests.conftest import require
from tests.dist_utils import run_distributed
from tests.test_parallel_equivalence import ADAPTIVE, TINY, global_batches, rank_microbatches
from tests.test_reshard_resume import base_overrides

REPO = Path(__file__).resolve().parents[1]
tiny_data = test_reshard_resume.tiny_data  # the fixture: four SOTU addresses, tokenized
DS = ["parallel.zero=deepspeed"]
METHODS = {"vanilla": [], "adaptive": ADAPTIVE}
RTOL = 2e-5  # fp32 reduction order (DeepSpeed sums the DP average in its own order)


@pytest.fixture(scope="module")
def deepspeed_installed():
    """The training tests need the extra (``pip install -e ".[deepspeed]"``); the refusals
    do not (config validation never imports DeepSpeed)."""
    require("deepspeed")


# -- equivalence --------------------------------------------------------------------------------
def _train(runs: dict[str, list[str]]) -> dict[str, Any]:
    """Each named config trains 3 steps on this process group (one init for all of them).

    Returns losses, grad norms, the rank's AdamW state size, the final weights and, per
    iteration, this rank's own mean latent steps (before the data-parallel average)."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training.loop import Engine

    out, ctx = {}, None
    for name, overrides in runs.items():
        cfg = load_config(None, TINY + overrides)
        ctx = ctx or init_distributed(cfg.parallel)
        engine = Engine(cfg, ctx, 128)
        own_steps: list[float] = []
        run = engine.run

        def recording(mbs, forward_only, run=run, own_steps=own_steps):
            stats = run(mbs, forward_only)
            own_steps.append(sum(s["mean_steps"] for s in stats) / len(stats))
            return stats

        engine.run = recording
        losses, norms = [], []
        for batch in global_batches(3, cfg.train.global_batch_size, cfg.data.seq_length):
            step = engine.train_step(rank_microbatches(batch, cfg.train.micro_batch_size,
                                                       ctx.dp_rank, ctx.dp_size))
            losses.append(step["lm_loss"])
            norms.append(step["grad_norm"])
        out[name] = {"losses": losses, "norms": norms, "own_steps": own_steps,
                     "opt_numel": engine.optimizer.local_state_numel(),
                     "params": {n: p.detach().clone() for n, p in engine.model.named_parameters()},
                     "tp_rank": ctx.tp_rank, "dp_rank": ctx.dp_rank}
    destroy_distributed()
    return out


def _runs(extra: list[str], zero2: list[str] | None = None) -> dict[str, list[str]]:
    """vanilla and adaptive at ZeRO-1 and ZeRO-2 (``zero2`` replaces the stage override)."""
    stages = {1: ["parallel.zero_stage=1"], 2: zero2 or ["parallel.zero_stage=2"]}
    return {f"{method}-zero{stage}": [*overrides, *DS, *stages[stage], *extra]
            for method, overrides in METHODS.items() for stage in (1, 2)}


BF16 = [*ADAPTIVE, "train.precision=bf16"]  # our autocast over DeepSpeed's fp32 master weights


@pytest.fixture(scope="module")
def single(deepspeed_installed) -> dict[str, Any]:
    return run_distributed(_train, 1, {**METHODS, "bf16": BF16})[0]


def _check(results: list[dict], single: dict, layout: str) -> dict[str, float]:
    """Every rank's losses and norms equal one process's; returns the largest relative
    differences (reported in the issue)."""
    worst = {f"{p} {k}": 0.0 for p in ("fp32", "bf16") for k in ("loss", "norm")}
    for ranks in results:
        for name, r in ranks.items():
            ref = single[name.split("-")[0]]
            torch.testing.assert_close(r["norms"], ref["norms"], rtol=RTOL, atol=0,
                                       msg=lambda m, n=name: f"{layout} {n}: {m}")
            torch.testing.assert_close(r["losses"], ref["losses"], rtol=RTOL, atol=0,
                                       msg=lambda m, n=name: f"{layout} {n}: {m}")
            for key, field in (("loss", "losses"), ("norm", "norms")):
                got, want = torch.tensor(r[field]), torch.tensor(ref[field])
                key = f"{'bf16' if name.startswith('bf16') else 'fp32'} {key}"
                worst[key] = max(worst[key], ((got - want).abs() / want.abs()).max().item())
    assert all(n > 0.05 for name in METHODS for n in single[name]["norms"])  # clip fires
    for name in ("adaptive-zero1", "adaptive-zero2"):  # DP ranks halted at different steps
        by_dp = {r[name]["dp_rank"]: r[name]["own_steps"] for r in results}
        assert by_dp[0] != by_dp[1], by_dp
    print(f"{layout}: max relative difference {worst}")
    return worst


def test_dp2_zero1_zero2_equal_one_process(single, tmp_path):
    """ZeRO-2 here through a ds_config.json with overlap_comm and buckets small enough that
    every backward fills several (the reduction runs while backward goes on)."""
    zero2 = _ds_file(tmp_path, {"zero_optimization": {
        "stage": 2, "overlap_comm": True, "reduce_bucket_size": 20000,
        "allgather_bucket_size": 20000, "contiguous_gradients": True}, "gradient_clipping": 0.05})
    runs = {**_runs([], [zero2]), "bf16-zero2": [*BF16, *DS, "parallel.zero_stage=2"]}
    results = run_distributed(_train, 2, runs)
    _check(results, single, "dp2")
    for name in ("vanilla-zero1", "vanilla-zero2"):  # AdamW states partitioned ~1/DP
        full = 2 * sum(p.numel() for p in single["vanilla"]["params"].values())
        for r in results:
            assert abs(r[name]["opt_numel"] - full / 2) <= 0.01 * full, (r[name]["opt_numel"], full)
    for name, r in results[0].items():  # fp32: the weights after 3 steps, element by element
        if name.startswith("bf16"):
            continue  # bf16 rounding, amplified the same way, reaches 2.8e-4: losses/norms only
        ref = single[name.split("-")[0]]["params"]
        worst = max(((p - ref[n]).abs().max() / ref[n].abs().max()).item()
                    for n, p in r["params"].items())
        assert worst < 2e-4, (name, worst)  # measured 3.3e-5: Adam's normalised steps
        # amplify fp32 reduction-order noise on elements with near-zero gradients


def test_tp2_dp2_zero1_zero2_equal_one_process(single):
    _check(run_distributed(_train, 4, _runs(["parallel.tensor_model_parallel_size=2"])),
           single, "tp2xdp2")


# -- checkpoints ----------------------------------------------------------------------------
ITERS, AT = 4, 2


def _trainers(trains: dict[str, list[str]], refusals: dict[str, list[str]]) -> dict[str, Any]:
    """On one new process group: the losses of a Trainer run for each config of ``trains``,
    then the CheckpointError line of each config of ``refusals`` (one spawn for all)."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.training.loop import Trainer

    ctx = init_distributed(load_config(None, next(iter(trains.values()))).parallel)
    out: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for name, overrides in trains.items():
            out[name] = Trainer(load_config(None, overrides), ctx).train()["losses"]
        for name, refused in refusals.items():
            try:
                Trainer(load_config(None, refused), ctx)
                out[name] = "no error"
            except ckpt.CheckpointError as e:
                out[name] = str(e)
    destroy_distributed()
    return out


def _weights(run_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"iter_{ITERS:07d}" / f"rank_{rank:05d}.pt",
                      weights_only=False)["model"]


def test_resume_in_new_processes_is_bit_exact_and_other_sharding_is_refused(
        deepspeed_installed, tiny_data, tmp_path):
    common = [*base_overrides(tiny_data), f"train.train_iters={ITERS}", *ADAPTIVE,
              "train.clip_grad=0.05"]
    base = [*common, *DS, "parallel.zero_stage=2"]
    whole = run_distributed(_trainers, 2, {"a": [*base, f"train.save={tmp_path}/a",
                                                 f"train.save_interval={AT}"]}, {})[0]["a"]
    (tmp_path / "a" / "latest").write_text(f"iter_{AT:07d}\n")
    load, init = f"train.load={tmp_path}/a", [f"train.init_from={tmp_path}/a", "train.train_iters=2"]
    resumed = run_distributed(_trainers, 2, {
        "losses": [*base, load, f"train.save={tmp_path}/b"],
        # train.init_from: DeepSpeed's fp32 master partitions must take the loaded weights
        # (else the first update would start from the random init): the second loss tells
        "init_ds": [*base, *init], "init_fsdp2": [*common, "parallel.zero=fsdp2", *init],
    }, {"to_fsdp2": [*common, "parallel.zero=fsdp2", load],  # FSDP2 <-> DeepSpeed
        "other_stage": [*common, *DS, "parallel.zero_stage=1", load]})[0]
    torch.testing.assert_close(resumed["init_ds"], resumed["init_fsdp2"], rtol=RTOL, atol=0)
    assert resumed["losses"] == whole[AT:], (resumed, whole)  # bit-exact losses
    for rank in (0, 1):
        a, b = _weights(tmp_path / "a", rank), _weights(tmp_path / "b", rank)
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    to_fsdp2, other_stage = resumed["to_fsdp2"], resumed["other_stage"]
    assert "parallel.zero=deepspeed" in to_fsdp2 and "parallel.zero=fsdp2" in to_fsdp2, to_fsdp2
    assert "\n" not in to_fsdp2
    assert "ZeRO stage" in other_stage, other_stage


# -- refusals -----------------------------------------------------------------------------------
def _ds_file(tmp_path: Path, content: dict) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(content))
    return f"parallel.deepspeed_config={path}"


REFUSED = {  # overrides -> what the one line must name
    "pp2": (["parallel.pipeline_model_parallel_size=2"], "parallel.pipeline_model_parallel_size"),
    "sp": (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
           "parallel.sequence_parallel"),
    "zero3": (["parallel.zero_stage=3"], "ZeRO-3 is not exact"),
    "stage0": (["parallel.zero_stage=0"], "parallel.zero_stage: expected 1 or 2"),
    "overlap_comm": ({"zero_optimization": {"stage": 1, "overlap_comm": True}}, "overlap_comm"),
    "offload": ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
                "offload_optimizer"),
    "fp16": ({"fp16": {"enabled": True}}, "train.precision"),
    "stage_conflict": ({"zero_optimization": {"stage": 1}}, "contradicts"),
    "mor_threshold": (["model.num_layers=4", "latent.method=mor", "latent.max_steps=2",
                       "mor.num_recursion=2", "mor.expert_selection=threshold"],
                      "mor.expert_selection=threshold"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_combinations_are_one_config_error(case, tmp_path):
    from megatron_latentcot.config import ConfigError, load_config

    what, needle = REFUSED[case]
    overrides = [_ds_file(tmp_path, what)] if isinstance(what, dict) else list(what)
    if case == "stage_conflict":
        overrides.append("parallel.zero_stage=2")
    with pytest.raises(ConfigError) as err:
        load_config(None, TINY + DS + overrides)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_deepspeed_fields_without_deepspeed_are_refused():
    from megatron_latentcot.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="only used with parallel.zero=deepspeed"):
        load_config(None, TINY + ["parallel.zero_stage=2"])


def test_cli_refuses_pipeline_with_one_line():
    """The command line prints exactly one ``config error:`` line and exits 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_latentcot.pretrain", *TINY, *DS,
         "parallel.pipeline_model_parallel_size=2", "--print-config"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("config error: parallel.zero=deepspeed"), lines
    assert "parallel.pipeline_model_parallel_size=1" in lines[0]


def _skip_then_step(stage: int) -> dict[str, Any]:
    """Two engines from the same init: one backpropagates a batch, skips it (as the loop does
    on a non-finite loss), then trains on the next; the other trains on the next directly."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training.loop import Engine

    cfg = load_config(None, TINY + [*ADAPTIVE, *DS, f"parallel.zero_stage={stage}"])
    ctx = init_distributed(cfg.parallel)
    first, second = (rank_microbatches(b, cfg.train.micro_batch_size, ctx.dp_rank, ctx.dp_size)
                     for b in global_batches(2, cfg.train.global_batch_size, cfg.data.seq_length))
    out = {}
    for name in ("skipped", "clean"):
        engine = Engine(cfg, ctx, 128)
        if name == "skipped":
            engine.run(first, False)
            engine.optimizer.skip()
        out[name] = engine.train_step(second)["grad_norm"]
    destroy_distributed()
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_a_skipped_iteration_leaves_no_gradient_behind(deepspeed_installed, stage):
    """ZeRO-2 accumulates into its own partition buffers across backwards: skipping an
    iteration must clear them too, or its gradients leak into the next update."""
    for r in run_distributed(_skip_then_step, 2, stage):
        assert r["skipped"] == r["clean"], r


def test_unreadable_deepspeed_config_is_one_line(tmp_path):
    """A missing file, a file that is not JSON and JSON that is not an object each give one
    ``parallel.deepspeed_config`` line naming the file, never a traceback from the parser."""
    from megatron_latentcot.config import ConfigError, load_config

    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for path, needle in ((tmp_path / "missing.json", "cannot read"), (bad, "is not JSON"),
                         (listed, "must hold a JSON object")):
        with pytest.raises(ConfigError) as err:
            load_config(None, TINY + DS + [f"parallel.deepspeed_config={path}"])
        msg = str(err.value)
        assert msg.startswith("parallel.deepspeed_config:") and str(path) in msg, msg
        assert needle in msg and "\n" not in msg, msg
