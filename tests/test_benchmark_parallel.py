"""Smoke test of benchmarks/parallel.py's instrumentation (one process, a world-of-one gloo
group; no megatron-core import): byte accounting, classification by tag / caller / autograd
node, timing only at the outermost call, the saved-activation formula and the summary."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from benchmarks import parallel as bench


@pytest.fixture
def world_of_one():
    """A world-of-one gloo group: this process's own if an earlier test left one (in-process
    tests only ever make worlds of one), else a new one, destroyed afterwards."""
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    assert dist.get_world_size() == 1
    rec = bench.CommRecorder()
    rec.install_torch()
    rec.active = True
    try:
        yield rec
    finally:
        rec.uninstall()
        if created:
            dist.destroy_process_group()


def _run_as(path: str, name: str, body: str):
    """Run ``body`` inside a function ``name`` whose code claims to live in ``path``."""
    src = f"def {name}(dist, torch):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    scope: dict = {}
    exec(compile(src, path, "exec"), scope)
    return scope[name](dist, torch)


def test_payload_bytes_ring_model(monkeypatch):
    monkeypatch.setattr(bench, "_group_size", lambda group: 4)
    t = torch.zeros(10)  # 40 bytes
    assert bench.payload_bytes("all_reduce", {"tensor": t}) == (40, 60)
    assert bench.payload_bytes("all_gather_into_tensor", {"output_tensor": t}) == (40, 30)
    assert bench.payload_bytes("reduce_scatter_tensor", {"output": t[:2], "input": t}) == (40, 30)
    assert bench.payload_bytes("all_gather", {"tensor_list": [t, t]}) == (80, 60)
    assert bench.payload_bytes("isend", {"tensor": t}) == (40, 40)
    assert bench.payload_bytes("recv", {"tensor": t}) == (40, 0)


def test_saved_activation_bytes():
    # steps 2..4 leave out 50 %, 75 %, 100 % of 100 tokens; hidden 8, fp32, 2 layers
    assert bench.saved_activation_bytes([1.0, 0.5, 0.25, 0.0], 100, 8, 2) == 2.25 * 100 * 8 * 4 * 2
    assert bench.saved_activation_bytes([1.0], 100, 8, 2) == 0


def test_recorder_classifies_and_times_outermost(world_of_one):
    rec = world_of_one
    out, inp = torch.empty(4), torch.ones(4)
    with rec.tag("regather"):
        dist.all_gather_into_tensor(out, inp)
    dist.all_reduce(torch.ones(3))  # from a test: nobody we know
    _run_as("/x/megatron_latentcot/model/latent.py", "_latent_steps",
            "dist.all_reduce(torch.ones(2))")
    _run_as("/x/torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py", "foreach_reduce",
            "dist.reduce_scatter_tensor(torch.empty(5), torch.ones(5))")
    _run_as("/x/megatron/core/tensor_parallel/layers.py", "forward",
            "dist.all_reduce(torch.ones(6))")
    tallies = rec.tallies
    assert tallies[("regather", "all_gather_into_tensor")].bytes == 16
    assert tallies[("regather", "all_gather_into_tensor")].wire_bytes == 0  # world of one
    assert tallies[("other", "all_reduce")].bytes == 12
    assert tallies[("latent_sync", "all_reduce")].bytes == 8
    assert tallies[("grad_reduce_scatter", "reduce_scatter_tensor")].bytes == 20
    assert tallies[("tp", "all_reduce")].bytes == 24
    assert all(t.calls == 1 and t.seconds > 0 for t in tallies.values())

    # an entry point wrapping a collective: timed once (outermost), bytes counted once (inner)
    rec.reset()
    entry = rec._wrap_entry(lambda x: (dist.all_reduce(x), x)[1], "reduce_from_region")
    with rec.tag("latent_sync"):
        entry(torch.ones(2))
    assert rec.tallies[("latent_sync", "all_reduce")].calls == 1
    assert rec.tallies[("latent_sync", "all_reduce")].seconds == 0.0  # inner: no time
    assert rec.tallies[("latent_sync", "reduce_from_region")].seconds > 0

    rec.active = False  # inactive: nothing recorded
    rec.reset()
    dist.all_reduce(torch.ones(1))
    assert rec.tallies == {}


def test_backward_of_a_tagged_node_is_classified(world_of_one):
    rec = world_of_one

    class AllReduceGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            dist.all_reduce(g)
            return g

    x = torch.ones(3, requires_grad=True)
    y = AllReduceGrad.apply(x)
    rec.tag_backward(y.grad_fn, "regather")
    (y * 2).sum().backward()
    assert rec.tallies[("regather", "all_reduce")].calls == 1
    assert rec._tags == []  # the tag is popped after the node ran
    dist.all_reduce(torch.ones(1))
    assert ("other", "all_reduce") in rec.tallies


def test_uninstall_restores_torch_distributed():
    before = dist.all_reduce
    rec = bench.CommRecorder()
    rec.install_torch()
    assert dist.all_reduce is not before
    rec.uninstall()
    assert dist.all_reduce is before


def test_summarize_two_ranks():
    def it(wall, regather_s, wire):
        return {"wall": wall, "cpu": wall / 2,
                "comm": {"regather/all_gather_into_tensor": {"calls": 2, "seconds": regather_s,
                                                             "bytes": 2 * wire, "wire_bytes": wire}},
                "metrics": {"active_frac_step1": 1.0, "active_frac_step2": 0.5,
                            "active_frac_step3": 0.5, "active_frac_step4": 0.0,
                            "mean_steps": 2.0, "lm_loss": 1.0}}

    setup = bench.Setup(8, 2, 2, 16, 32, 4, 1, 2, rounds=1, warmup=0, repeats=1)
    runs = [[{"coords": {"rank": 0}, "iterations": [it(1.0, 0.2, 100)]}],
            [{"coords": {"rank": 1}, "iterations": [it(2.0, 0.4, 300)]}]]
    s = bench.summarize(bench.LAYOUTS[1], setup, runs, None)
    assert s["s_per_iter"] == 2.0  # the slowest rank
    assert s["comm_s_by_category"]["regather"] == pytest.approx(0.3)  # mean over ranks
    assert s["compute_frac"] == pytest.approx((0.8 + 1.6) / 3.0)
    assert s["regather_wire_bytes"] == 400  # summed over ranks
    saved = (0.5 + 0.5 + 1.0) * (2 * 4) * 8 * 4 * 2
    assert s["saved_activation_bytes"] == saved
    assert s["regather_over_saved"] == pytest.approx(400 / saved)
