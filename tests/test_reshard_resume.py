"""Resume with another parallel layout: a checkpoint saved at TP/PP/DP layout A is re-sliced for
layout B (training/reshard.py). Right after the load, every weight and AdamW state (exp_avg,
exp_avg_sq, step) equals the checkpoint's exactly; the next iterations' losses equal layout A's
continuing run to fp32 reduction-order noise; what cannot be mapped fails with a CheckpointError
naming the difference."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from megatron_latentcot.fileutil import sha256_file
from tests.dist_utils import run_distributed
from tests.test_training import TINY

ITERS, AT = 6, 3  # layout A trains ITERS iterations and saves at AT; layout B resumes from AT
SOURCES = {"tp2": ["parallel.tensor_model_parallel_size=2"],
           "dp2": ["parallel.zero=fsdp2"],
           "pp2": ["parallel.pipeline_model_parallel_size=2"]}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, corpus_paths, sp_tokenizer, sp_tokenizer_path) -> dict[str, str]:
    """Four SOTU addresses, tokenized in this process (no valid split: eval is off)."""
    from megatron_latentcot.data.corpus import read_jsonl_texts
    from megatron_latentcot.data.indexed import IndexedWriter

    prefix = tmp_path_factory.mktemp("reshard_data") / "train"
    with IndexedWriter(prefix, sp_tokenizer.vocab_size) as w:
        for text in read_jsonl_texts(corpus_paths.train)[:4]:
            w.add_document(sp_tokenizer.encode(text) + [sp_tokenizer.eod])
        w.finalize({"tokenizer_fingerprint": sp_tokenizer.fingerprint,
                    "vocab_size": sp_tokenizer.vocab_size})
    return {"prefix": str(prefix), "tokenizer": str(sp_tokenizer_path)}


def base_overrides(data: dict[str, str]) -> list[str]:
    return TINY + [f"data.data_path=[{data['prefix']}]", f"data.tokenizer_model={data['tokenizer']}",
                   "data.split=1,0,0", "train.eval_iters=0", "train.log_interval=1",
                   f"train.train_iters={ITERS}", "train.keep_last=10"]


# -- workers (spawned) ------------------------------------------------------------------------
def _train_sources(base: list[str], root: str, layouts: dict[str, list[str]]) -> dict[str, Any]:
    """Each layout A trains ITERS iterations, saving at AT; one process group for all."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training.loop import Trainer

    out = {}
    for name, overrides in layouts.items():
        cfg = load_config(None, base + overrides + [f"train.save={root}/{name}",
                                                    f"train.save_interval={AT}"])
        with contextlib.redirect_stdout(io.StringIO()):
            out[name] = Trainer(cfg, init_distributed(cfg.parallel)).train()["losses"]
    destroy_distributed()
    return out


def _restored_exactly(trainer, ckpt_dir: Path) -> list[str]:
    """Names of weights / AdamW states of this (world-of-one) trainer that differ from the
    checkpoint's full tensors; [] when every one is bit-identical."""
    import torch

    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.training import reshard

    files = reshard.RankFiles(ckpt_dir, ckpt.read_manifest(ckpt_dir))
    layouts = trainer.engine.optimizer.layouts
    full = files.gather(layouts)
    holders = files.holders(files.model_states())
    saved_opt = {r: reshard.optimizer_by_name(files.payload(r), files.path(r))[0]
                 for r in files.ranks}
    opt = trainer.engine.optimizer.optimizer
    wrong = []
    for name, p in trainer.engine.model.named_parameters():
        if not torch.equal(p.detach(), full[name]):
            wrong.append(name)
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            saved = files.assemble(name, {r: saved_opt[r][name][key] for r in holders[name]},
                                   layouts)
            if not torch.equal(st[key], saved):
                wrong.append(f"{name}.{key}")
        if any(saved_opt[r][name]["step"].item() != st["step"].item() for r in holders[name]):
            wrong.append(f"{name}.step")
    return wrong


def _resume_in_one_process(base: list[str], root: str, names: list[str]) -> dict[str, Any]:
    """Layout B = TP = PP = DP = 1: resume each layout-A checkpoint, then the refusals."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.training.loop import Trainer

    ctx = init_distributed(load_config(None, base).parallel)
    out: dict[str, Any] = {}
    for name in names:
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            t = Trainer(load_config(None, base + [f"train.load={root}/{name}"]), ctx)
            state = {"iteration": t.state.iteration, "consumed": t.state.consumed_samples}
            wrong = _restored_exactly(t, Path(root, name, f"iter_{AT:07d}"))
            losses = t.train()["losses"]
        out[name] = dict(state, wrong=wrong, losses=losses, log=log.getvalue())

    def refusal(load: Path, *extra: str) -> str:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                Trainer(load_config(None, base + [f"train.load={load}", *extra]), ctx)
        except ckpt.CheckpointError as e:
            return str(e)
        return "no error"

    src = Path(root, "tp2")
    out["refused"] = {
        "shape": refusal(src, "model.num_layers=4", "model.num_attention_heads=8"),
        "method": refusal(src, "latent.method=adaptive"),
        "vocab": refusal(src, "model.vocab_size=4224"),
    }

    def tampered(tag: str, edit) -> Path:
        """A copy of tp2's checkpoint with rank 1's file edited (manifest checksum updated)."""
        import torch

        copy = Path(root, f"tampered_{tag}")
        shutil.copytree(src / f"iter_{AT:07d}", copy / f"iter_{AT:07d}")
        (copy / "latest").write_text(f"iter_{AT:07d}\n")
        f = copy / f"iter_{AT:07d}" / "rank_00001.pt"
        payload = torch.load(f, weights_only=False)
        edit(payload)
        torch.save(payload, f)
        manifest_path = copy / f"iter_{AT:07d}" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][f.name] = sha256_file(f)
        manifest_path.write_text(json.dumps(manifest))
        return copy

    def state_of(payload: dict, name: str) -> dict:
        group = next(g for g in payload["optimizer"]["param_groups"] if name in g["param_names"])
        return payload["optimizer"]["state"][group["params"][group["param_names"].index(name)]]

    down = "layers.1.mlp.down_proj.weight"

    def bad_shape(p):
        state_of(p, down)["exp_avg"] = state_of(p, down)["exp_avg"][:, :-1].clone()

    def bad_step(p):
        state_of(p, down)["step"] += 1

    out["refused"]["exp_avg"] = refusal(tampered("shape", bad_shape))
    out["refused"]["step"] = refusal(tampered("step", bad_step))
    out["refused"]["no_optimizer"] = refusal(tampered("none", lambda p: p.pop("optimizer")))
    destroy_distributed()
    return out


# -- tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed(tiny_data, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reshard")
    base = base_overrides(tiny_data)
    sources = run_distributed(_train_sources, 2, base, str(root), SOURCES)[0]
    for name in SOURCES:  # resume from iteration AT, not from the final save
        (root / name / "latest").write_text(f"iter_{AT:07d}\n")
    out = run_distributed(_resume_in_one_process, 1, base, str(root), list(SOURCES))[0]
    out.update(sources=sources, root=str(root), base=base)
    return out


@pytest.mark.parametrize("name", list(SOURCES))
def test_resume_from_two_ranks_on_one_is_exact(resumed, name):
    """TP2 -> TP1, DP2 (FSDP2-sharded AdamW states) -> DP1, PP2 -> PP1."""
    got, reference = resumed[name], resumed["sources"][name]
    assert got["iteration"] == AT and got["consumed"] == AT * 8
    assert got["wrong"] == [], got["wrong"]  # weights and exp_avg / exp_avg_sq / step, bitwise
    assert len(got["losses"]) == ITERS - AT
    for a, b in zip(got["losses"], reference[AT:]):
        assert abs(a - b) <= 1e-5 * abs(b), (got["losses"], reference)
    assert "re-sliced from tp=" in got["log"] and "RNG states NOT restored" in got["log"]


def test_unmappable_checkpoints_are_refused_naming_the_difference(resumed):
    r = resumed["refused"]
    assert "saved with a different model (model.num_attention_heads: 4 -> 8; " \
           "model.num_layers: 2 -> 4)" in r["shape"]
    assert "latent.method: 'vanilla' -> 'adaptive'" in r["method"]
    assert "embedding rows (padded vocabulary): 4096 -> 4224" in r["vocab"]
    assert "cannot re-slice it from tp=2 pp=1 dp=1 to tp=1 pp=1 dp=1" in r["exp_avg"]
    assert "optimizer state 'exp_avg' of layers.1.mlp.down_proj.weight: shaped" in r["exp_avg"]
    assert "optimizer state 'step' of layers.1.mlp.down_proj.weight: differs between rank " \
           "files (['3.0', '4.0'])" in r["step"]
    assert "rank_00001.pt: no optimizer state ('optimizer' entry)" in r["no_optimizer"]


def _resume_unsharded(base: list[str], root: str) -> dict[str, Any]:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training.loop import Trainer

    cfg = load_config(None, base + ["parallel.zero=none", f"train.load={root}/dp2"])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        t = Trainer(cfg, init_distributed(cfg.parallel))
        losses = t.train()["losses"]
    destroy_distributed()
    return {"losses": losses, "log": log.getvalue(), "numel": t.engine.optimizer.local_state_numel()}


@pytest.mark.slow
def test_same_layout_without_fsdp2_reslices_the_dp_shards(resumed):
    """DP2 with FSDP2 -> DP2 with parallel.zero=none: same ranks, other optimizer sharding."""
    results = run_distributed(_resume_unsharded, 2, resumed["base"], resumed["root"])
    reference = resumed["sources"]["dp2"]
    for r in results:
        for a, b in zip(r["losses"], reference[AT:], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (r["losses"], reference)
        assert r["numel"] == results[0]["numel"]  # every rank holds all the AdamW state
    assert "re-sliced for this run's FSDP2 sharding" in results[0]["log"], results[0]["log"]


def _resume_failing_on_rank_1(base: list[str], root: str) -> str:
    """Same-layout resume of the DP2 checkpoint where rank 1 cannot take its optimizer state."""
    import os

    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.training.loop import Trainer

    if os.environ["RANK"] == "1":
        def broken(optimizer, state):
            raise RuntimeError("simulated: this state does not fit")
        ckpt.restore_optimizer = broken
    cfg = load_config(None, base + ["parallel.zero=fsdp2", f"train.load={root}/dp2",
                                    f"train.save={root}/dp2_failing"])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            Trainer(cfg, init_distributed(cfg.parallel))
        error = ""
    except ckpt.CheckpointError as e:
        error = str(e)
    destroy_distributed()
    return error


def test_a_rank_that_cannot_restore_stops_every_rank(resumed):
    """Rank 0 restored fine, rank 1 failed: both raise the same error naming rank 1 (rank 0
    must not go on into training and wait for rank 1 in a collective)."""
    errors = run_distributed(_resume_failing_on_rank_1, 2, resumed["base"], resumed["root"],
                             timeout=120)
    assert errors[0] == errors[1]
    assert "rank 1:" in errors[0] and "simulated: this state does not fit" in errors[0], errors


# -- four processes: TP1 -> TP2 x DP2 (FSDP2) -------------------------------------------------
def _resume_tp2_dp2(base: list[str], root: str) -> dict[str, Any]:
    """Resume the TP1 checkpoint at TP2 x DP2, save right away (the round trip), train on."""
    import torch.distributed as dist

    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import destroy_distributed, init_distributed
    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.training import reshard
    from megatron_latentcot.training.loop import Trainer

    cfg = load_config(None, base + ["parallel.tensor_model_parallel_size=2",
                                    f"train.load={root}/tp1", f"train.save={root}/tp2dp2"])
    ctx = init_distributed(cfg.parallel)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        t = Trainer(cfg, ctx)
        t.save()  # iteration AT again, now as TP2 x DP2 rank files
        losses = t.train()["losses"]
    out: dict[str, Any] = {"losses": losses, "log": log.getvalue(),
                           "sharded": t.engine.optimizer.sharded}
    if ctx.rank == 0:  # the full tensors of both checkpoints, weights and AdamW states
        layouts = t.engine.optimizer.layouts
        full = {}
        for tag, path in (("a", Path(root, "tp1", f"iter_{AT:07d}")),
                          ("b", Path(root, "tp2dp2", f"iter_{AT:07d}"))):
            files = reshard.RankFiles(path, ckpt.read_manifest(path))
            holders = files.holders(files.model_states())
            opt = {r: reshard.optimizer_by_name(files.payload(r), files.path(r))[0]
                   for r in files.ranks}
            tensors = files.gather(layouts)
            for name in list(tensors):
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    pieces = {r: opt[r][name][key] for r in holders[name]}
                    tensors[f"{name}.{key}"] = (
                        files.assemble(name, pieces, layouts) if key != "step"
                        else next(iter(pieces.values())))
            full[tag] = (tensors, files.layout)
        out["layouts"] = (full["a"][1], full["b"][1])
        out["differ"] = sorted(k for k in full["a"][0] if not full["a"][0][k].equal(full["b"][0][k]))
        out["names"] = len(full["a"][0])
    dist.barrier()
    destroy_distributed()
    return out


@pytest.mark.slow
def test_resume_from_one_rank_on_tp2_dp2_is_exact(tiny_data, tmp_path):
    base = base_overrides(tiny_data)
    source = run_distributed(_train_sources, 1, base, str(tmp_path), {"tp1": []})[0]["tp1"]
    (tmp_path / "tp1" / "latest").write_text(f"iter_{AT:07d}\n")
    results = run_distributed(_resume_tp2_dp2, 4, base, str(tmp_path))
    r0 = results[0]
    assert r0["layouts"] == ({"tp": 1, "pp": 1, "dp": 1, "world": 1},
                             {"tp": 2, "pp": 1, "dp": 2, "world": 4})
    assert r0["sharded"] and r0["names"] > 0 and r0["differ"] == [], r0["differ"]
    for r in results:
        for a, b in zip(r["losses"], source[AT:], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (r["losses"], source)
    log = r0["log"]  # the logging rank: first of the last stage
    assert "re-sliced from tp=1 pp=1 dp=1 to tp=2 pp=1 dp=2" in log, log
