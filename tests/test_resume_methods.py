"""Resume of every method with data parallelism and FSDP2-sharded AdamW states (DP2), where
small parameters shard unevenly (the router's (1, d) weight and (1,) bias, pause embeddings):
one DP rank holds their rows, the other an empty shard.

Per method, against an uninterrupted run (bit for bit: losses, and every weight and AdamW
state of the final rank files):

- SIGTERM to rank 1 after iteration 3 saves ``iter_3`` and stops; a new Trainer resumes;
- SIGKILL after iteration 3 leaves the periodic ``iter_2``: resumed from it (iteration 3
  recomputed), and ``metrics.jsonl`` then holds each iteration once;
- across optimizer shardings: ``iter_3`` re-sliced for ``parallel.zero=none`` and saved, then
  re-sliced back into FSDP2 DTensors: exact again.

All six methods run in one DP2 process group (about 90 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.dist_utils import run_distributed
from tests.test_reshard_resume import base_overrides, tiny_data  # noqa: F401  (fixture)

ITERS, AT = 5, 3  # SIGTERM after iteration AT; periodic saves every 2 iterations
METHODS = {"vanilla": [], "adaptive": ["latent.tau=0.3"], "latent_fixed": [], "looped": [],
           "pause": [], "pondering": []}


def _rank_file_diff(a: Path, b: Path, rank: int) -> list[str]:
    """Keys of this rank's model / optimizer-state tensors that differ between two saves."""
    import torch

    def tensors(path: Path) -> dict[str, Any]:
        payload = torch.load(path / f"rank_{rank:05d}.pt", weights_only=False)
        out = {f"model.{k}": v for k, v in payload["model"].items() if torch.is_tensor(v)}
        for idx, st in payload["optimizer"]["state"].items():
            out.update({f"optimizer.{idx}.{k}": v for k, v in st.items()})
        return out

    left, right = tensors(a), tensors(b)
    return sorted(k for k in left.keys() | right.keys()
                  if k not in left or k not in right or left[k].shape != right[k].shape
                  or not torch.equal(left[k], right[k]))


def _flows(over: list[str], d: Path, rank: int, ctx_box: list) -> dict[str, Any]:
    """Every flow of the module docstring for one method (``over``: its overrides)."""
    import signal

    import torch

    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import init_distributed
    from megatron_latentcot.training.loop import Trainer

    def trainer(save: Path, *more: str, load: bool = False) -> Trainer:
        cfg = load_config(None, over + [f"train.save={save}", *more]
                          + ([f"train.load={save}"] if load else []))
        ctx_box[0] = ctx_box[0] or init_distributed(cfg.parallel)
        with contextlib.redirect_stdout(io.StringIO()):
            return Trainer(cfg, ctx_box[0])

    def run(t: Trainer) -> dict[str, Any]:
        with contextlib.redirect_stdout(io.StringIO()):
            return t.train()

    ref = run(trainer(d / "ref"))
    t = trainer(d / "stopped")
    uneven = sorted(n for n, p in t.engine.model.named_parameters()
                    if p.to_local().shape[0] * 2 != p.shape[0])
    step = t.engine.train_step

    def sigterm_after_at(mbs):
        res = step(mbs)
        if rank == 1 and t.state.iteration == AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return res
    t.engine.train_step = sigterm_after_at
    stopped = run(t)
    killed = d / "killed"  # what a SIGKILL during iteration AT + 1 leaves behind
    if rank == 0:
        shutil.copytree(d / "stopped", killed)
        (killed / "latest").write_text("iter_0000002\n")
    # fsdp2 -> zero=none (saved at once) -> fsdp2
    t = trainer(d / "unsharded", "parallel.zero=none", f"train.load={d / 'stopped'}")
    t.save()
    unsharded_ok = not t.engine.optimizer.sharded and t.state.iteration == AT
    after_term = run(trainer(d / "stopped", load=True))
    after_kill = run(trainer(killed, load=True))
    t = trainer(d / "resharded", f"train.load={d / 'unsharded'}")
    global_shapes = all(t.engine.optimizer.optimizer.state[p]["exp_avg"].shape == p.shape
                        for p in t.engine.model.parameters())
    after_reshard = run(t)
    torch.distributed.barrier()
    final = f"iter_{ITERS:07d}"
    return {"uneven": uneven, "ref": ref["losses"], "stopped": stopped,
            "after_term": after_term["losses"], "after_kill": after_kill["losses"],
            "after_reshard": after_reshard["losses"], "unsharded_ok": unsharded_ok,
            "global_shapes_ok": global_shapes,
            "diff": {name: _rank_file_diff(d / "ref" / final, d / name / final, rank)
                     for name in ("stopped", "killed", "resharded")},
            "metrics": (killed / "metrics.jsonl").read_text() if rank == 0 else ""}


def _methods_dp2(base: list[str], root: str, methods: list[str]) -> dict[str, Any]:
    """:func:`_flows` for each method in one DP2 process group; a method that fails is
    reported (both ranks fail alike: training raises on both)."""
    import traceback

    from megatron_latentcot.parallel import destroy_distributed

    rank, ctx_box = int(os.environ["RANK"]), [None]
    out: dict[str, Any] = {}
    for method in methods:
        over = base + [f"latent.method={method}", "latent.max_steps=2",
                       "model.embedding_multiplier=null", f"train.train_iters={ITERS}",
                       "train.save_interval=2", *METHODS[method]]
        try:
            out[method] = _flows(over, Path(root, method), rank, ctx_box)
        except Exception:
            out[method] = {"error": traceback.format_exc()}
    destroy_distributed()
    return out


@pytest.fixture(scope="module")
def dp2_runs(tiny_data, tmp_path_factory) -> list[dict[str, Any]]:  # noqa: F811
    """Every method in one two-process run (one spawn; about 90 s on two cores)."""
    root = tmp_path_factory.mktemp("resume_methods")
    return run_distributed(_methods_dp2, 2, base_overrides(tiny_data), str(root), list(METHODS),
                           timeout=900)


@pytest.mark.parametrize("method", list(METHODS))
def test_dp2_fsdp2_resume_is_bit_exact_for_every_method(dp2_runs, method):
    for rank, runs in enumerate(dp2_runs):
        got = runs[method]
        assert "error" not in got, got.get("error")
        ref = got["ref"]
        assert len(ref) == ITERS
        assert got["stopped"]["preempted"] == "SIGTERM" and got["stopped"]["iteration"] == AT
        assert got["stopped"]["losses"] + got["after_term"] == ref, (rank, got)
        assert got["after_kill"] == ref[2:], (rank, got)  # iteration AT recomputed
        assert got["after_reshard"] == ref[AT:], (rank, got)
        assert got["unsharded_ok"] and got["global_shapes_ok"], (rank, got)
        assert got["diff"] == {"stopped": [], "killed": [], "resharded": []}, (rank, got["diff"])
    uneven = dp2_runs[0][method]["uneven"]
    if method == "adaptive":  # the point of the test: shards of one row, one of them empty
        assert uneven == ["router.bias", "router.weight"], uneven
    if method == "pause":
        assert "pause_embeddings.weight" in uneven, uneven
    rows = [json.loads(line) for line in dp2_runs[0][method]["metrics"].splitlines()]
    train = [r["iteration"] for r in rows if r["split"] == "train"]
    assert train == list(range(1, ITERS + 1)), train  # the recomputed iteration once


def test_metrics_rows_past_the_resumed_iteration_are_dropped(tmp_path):
    """A resumed run does iterations 4.. again: their earlier rows (and a line cut by a kill)
    go, so that metrics.jsonl holds each iteration once."""
    from megatron_latentcot.config import Config
    from megatron_latentcot.training.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    rows = [{"split": "train", "iteration": i, "lm_loss": float(i)} for i in range(1, 6)]
    rows.insert(3, {"split": "valid", "iteration": 3, "loss": 1.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"split": "train", "itera')
    log = MetricsLogger(Config(), True, tmp_path, iteration=3)
    log.log(4, {"lm_loss": 40.0})
    log.close()
    got = [(r["split"], r["iteration"], r.get("lm_loss")) for r in
           map(json.loads, path.read_text().splitlines())]
    assert got == [("train", 1, 1.0), ("train", 2, 2.0), ("train", 3, 3.0), ("valid", 3, None),
                   ("train", 4, 40.0)]
    MetricsLogger(Config(), True, tmp_path, iteration=0).close()  # from scratch
    assert path.read_text() == ""
