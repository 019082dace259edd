"""Which method runs under which layout: one answer everywhere, and the layouts really run.

- Config validation (so ``--print-config``), the planner's ``--check`` and the scheduler give
  the same answer for every method x layout, and it is the one the README states.
- The README's layouts train, evaluate (PP: only the last stage has losses) and save through
  the command line (torchrun).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_latentcot import plan as P
from megatron_latentcot import pretrain
from megatron_latentcot.config import METHODS, ConfigError, load_config
from tests.test_training import TINY, data_overrides, sotu_data  # noqa: F401  (the data fixture)

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=160", "model.vocab_size=256",
         "data.seq_length=32", "model.max_position_embeddings=128", "train.micro_batch_size=2",
         "train.global_batch_size=2"]


def expected_to_run(method: str, k: int, pp: bool, sp: bool, compact: bool) -> bool:
    """What the README says, written out independently of config.py's table."""
    if method == "mor":  # one stage, whole activations, always compacted (whatever N_r)
        return not pp and not sp and compact
    if method == "vanilla" or k == 1:
        return True
    if method in ("pause", "pondering", "ponderlm2"):
        return not pp and not sp
    if pp and sp:
        return False
    return compact or method == "looped" or not (pp or sp)


def _layout(method: str, k: int, pp: bool, sp: bool, compact: bool) -> list[str]:
    mor = [f"mor.num_recursion={k}", "model.num_layers=6"] if method == "mor" else []
    return SMALL + mor + [f"latent.method={method}", f"latent.max_steps={k}",
                    f"latent.compact={str(compact).lower()}",
                    f"parallel.pipeline_model_parallel_size={2 if pp else 1}",
                    f"parallel.tensor_model_parallel_size={2 if sp else 1}",
                    f"parallel.sequence_parallel={str(sp).lower()}"]


def test_config_planner_and_scheduler_agree_on_every_method_and_layout(capsys):
    from megatron_latentcot.config import ParallelConfig
    from megatron_latentcot.model.latent import LatentStepScheduler
    from megatron_latentcot.model.llama import LlamaStage
    from megatron_latentcot.parallel import init_distributed

    base = load_config(None, SMALL)
    stage = LlamaStage(base, init_distributed(ParallelConfig()), 256)
    for method, k, pp, sp, compact in itertools.product(METHODS, (1, 3), *[(False, True)] * 3):
        overrides = _layout(method, k, pp, sp, compact)
        case = f"{method} K={k} pp={pp} sp={sp} compact={compact}"
        runs = expected_to_run(method, k, pp, sp, compact)
        try:
            load_config(None, overrides)
            config_runs, message = True, ""
        except ConfigError as e:
            config_runs, message = False, str(e)
        print_rc = pretrain.main(["--print-config", *overrides])
        capsys.readouterr()
        plan_rc = P.main(["--check", *overrides])
        planner_out = capsys.readouterr()
        # The scheduler on a config that skipped validation (as dataclasses.replace would).
        unchecked = dataclasses.replace(base, latent=dataclasses.replace(
            base.latent, method=method, max_steps=k, compact=compact), parallel=dataclasses.replace(
            base.parallel, pipeline_model_parallel_size=2 if pp else 1,
            tensor_model_parallel_size=2 if sp else 1, sequence_parallel=sp))
        try:
            LatentStepScheduler(stage, unchecked)
            scheduler_runs = True
        except ConfigError:
            scheduler_runs = False
        answers = (config_runs, print_rc == 0, plan_rc == 0, scheduler_runs)
        assert answers == (runs,) * 4, (case, message, planner_out)
        if not runs:  # one line naming the method and the fields
            assert "\n" not in message and f"latent.method={method}" in message, message
            assert message in planner_out.err, (case, planner_out.err)


def test_planner_check_accepts_adaptive_with_pipeline_parallelism():
    """The issue's command: adaptive under PP2 plans (with enough memory) instead of refusing."""
    rc = P.main(["--config", str(REPO / "examples/configs/410m_adaptive.yaml"), "--world-size",
                 "8", "--check", "--gpu-memory-gb", "1000",
                 "parallel.pipeline_model_parallel_size=2"])
    assert rc == 0


def _torchrun(nproc: int, overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(nproc), "-m", "megatron_latentcot.pretrain", *overrides],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


PP2, TP2 = ["parallel.pipeline_model_parallel_size=2"], ["parallel.tensor_model_parallel_size=2"]
ADAPTIVE = ["latent.method=adaptive", "latent.max_steps=2"]


# The README's layouts (one-pass and latent loop); -m 'not slow' keeps only the first.
@pytest.mark.parametrize("nproc,layout", [
    pytest.param(2, PP2, id="vanilla-pp2"),
    pytest.param(4, PP2 + TP2, id="vanilla-tp2xpp2", marks=pytest.mark.slow),
    pytest.param(2, PP2 + ["latent.method=latent_fixed", "latent.max_steps=1"],
                 id="latent_fixed-k1-pp2", marks=pytest.mark.slow),
    pytest.param(2, PP2 + ADAPTIVE, id="adaptive-pp2", marks=pytest.mark.slow),
    pytest.param(4, PP2 + TP2 + ADAPTIVE, id="adaptive-tp2xpp2", marks=pytest.mark.slow),
    pytest.param(2, TP2 + ["parallel.sequence_parallel=true"] + ADAPTIVE, id="adaptive-tp2-sp",
                 marks=pytest.mark.slow),
    pytest.param(2, ADAPTIVE, id="adaptive-dp2", marks=pytest.mark.slow),
])
def test_readme_layouts_train_evaluate_and_save_through_the_cli(sotu_data, tmp_path,  # noqa: F811
                                                                nproc, layout):
    save = tmp_path / "run"
    out = _torchrun(nproc, TINY + data_overrides(sotu_data) + layout + [
        "train.train_iters=2", "train.log_interval=1", "train.eval_interval=1",
        "train.eval_iters=1", f"train.save={save}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (save / "latest").read_text().strip() == "iter_0000002"
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    valid = [r["loss"] for r in rows if r["split"] == "valid"]
    assert len(valid) >= 2 and all(0 < v < 20 for v in valid), valid  # iterations 1 and 2
