"""Per-micro-batch stats stay on the device; an iteration's metrics cost one host sync and are
bit-identical to the former per-stat ``.item()`` computation (re-implemented here as the
reference)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from tests.inference_utils import TINY

VOCAB = 96
SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def counting_syncs():
    """Count every Tensor method that reads a value back to the host (a sync on a GPU)."""
    calls: list[str] = []
    saved = {name: torch.Tensor.__dict__.get(name) for name in SYNCS}
    for name in SYNCS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **kw):
            calls.append(_name)
            return _orig(self, *a, **kw)

        setattr(torch.Tensor, name, wrapper)
    try:
        yield calls
    finally:
        for name, orig in saved.items():
            if orig is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, orig)


def old_stats(sched, out, mb) -> dict[str, float]:
    """The stats as the scheduler computed them before (a ``.item()`` per device value)."""
    rows, seq = mb["tokens"].shape
    n = rows * seq
    s = {"lm_loss": out.lm_loss.item(), "tokens": float(n),
         "mean_steps": out.steps.float().mean().item()}
    if sched.cfg.latent.method == "adaptive":
        s["adaptive_loss"] = out.adaptive_loss.item()
        gates = [r.gates.double() for r in out.records if r.gates is not None]
        g = torch.cat(gates) if gates else torch.zeros(0, dtype=torch.float64)
        count, total = float(g.numel()), g.sum().item()
        if count == 0:
            s["gate_mean"], s["gate_std"] = 0.0, 0.0
        else:
            mean = total / count
            squares = (g - mean).pow(2).sum().item()
            s["gate_mean"] = mean
            s["gate_std"] = math.sqrt(squares / (count - 1)) if count > 1 else 0.0
    for k in range(1, sched.max_steps + 1):
        live = out.records[k - 1].live if k <= len(out.records) else 0
        s[f"active_frac_step{k}"] = live / n
    s["flops"] = float(sched.counts(out).train_flops(sched.cfg.model, sched.stage.vocab_size))
    return s


def old_reduce(stats: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    """The former ``Engine.reduce_stats`` on one rank (Python sums, one ``.item()`` per key)."""
    values = torch.tensor([sum(s[k] for s in stats) for k in keys] + [len(stats)],
                          dtype=torch.float64)
    count = values[-1].clamp(min=1)
    return {k: (values[i] if k == "flops" else values[i] / count).item()
            for i, k in enumerate(keys)}


def _batches(n: int, rows: int, seq: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        data = torch.randint(0, VOCAB, (rows, seq + 1), generator=torch.Generator().manual_seed(i))
        out.append({"tokens": data[:, :-1], "labels": data[:, 1:],
                    "loss_mask": torch.ones(rows, seq)})
    return out


@pytest.mark.parametrize("method", ["adaptive", "latent_fixed", "vanilla"])
def test_iteration_metrics_equal_the_old_ones_with_one_sync(method, monkeypatch):
    from megatron_latentcot.config import load_config
    from megatron_latentcot.inference.loading import world_of_one
    from megatron_latentcot.training.loop import Engine

    cfg = load_config(None, TINY + [f"latent.method={method}", f"model.vocab_size={VOCAB}",
                                    "parallel.zero=none", "train.micro_batch_size=2",
                                    "train.global_batch_size=6", "latent.tau=0.45"])
    engine = Engine(cfg, world_of_one(), VOCAB)
    sched = engine.scheduler
    old_per_mb: list[dict[str, float]] = []
    stats_syncs: list[int] = []
    reduce_syncs: list[int] = []
    real_stats, real_reduce = sched.stats, engine.reduce_stats

    def spy_stats(out, mb):
        with counting_syncs() as calls:
            new = real_stats(out, mb)
        stats_syncs.append(len(calls))
        old_per_mb.append(old_stats(sched, out, mb))
        assert new.keys() == old_per_mb[-1].keys() == set(sched.stat_names())
        for k, v in new.items():  # the same value, kept on the device when it was computed there
            assert isinstance(v, torch.Tensor) == (k in ("lm_loss", "mean_steps", "adaptive_loss",
                                                         "gate_mean", "gate_std")), k
            assert float(v) == old_per_mb[-1][k], k
            assert not isinstance(v, torch.Tensor) or not v.requires_grad, k  # no graph kept
        return new

    def spy_reduce(stats):
        with counting_syncs() as calls:
            out = real_reduce(stats)
        reduce_syncs.append(len(calls))
        return out

    monkeypatch.setattr(sched, "stats", spy_stats)
    monkeypatch.setattr(engine, "reduce_stats", spy_reduce)
    for _ in range(2):
        metrics = engine.train_step(_batches(3, 2, cfg.data.seq_length))
        new = {k: metrics[k] for k in sched.stat_names()}
        want = old_reduce(old_per_mb[-3:], sched.stat_names())
        assert new == want  # bit-identical logged numbers
    assert stats_syncs == [0] * 6 and reduce_syncs == [1, 1]
    if method == "adaptive":
        assert 0 < metrics["gate_std"] and 0 < metrics["gate_mean"] < 1
        assert 1 < metrics["mean_steps"] < cfg.latent.max_steps
    # evaluation goes through the same reduction
    assert engine.eval_loss(_batches(2, 2, cfg.data.seq_length)) == old_reduce(
        old_per_mb[-2:], sched.stat_names())["lm_loss"]


def test_a_stage_without_stats_sums_to_zero_micro_batches():
    from megatron_latentcot.training.metrics import mean_stats, sum_stats

    keys = ["lm_loss", "flops"]
    for empty in ([], [{}, {}]):
        v = sum_stats(empty, keys, torch.device("cpu"))
        assert v.tolist() == [0.0, 0.0, 0.0]
        assert mean_stats(v, keys) == {"lm_loss": 0.0, "flops": 0.0}
    v = sum_stats([{"lm_loss": torch.tensor(2.0), "flops": 10.0},
                   {"lm_loss": torch.tensor(3.0), "flops": 5.0}], keys, torch.device("cpu"))
    assert mean_stats(v, keys) == {"lm_loss": 2.5, "flops": 15.0}
