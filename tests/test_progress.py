"""What training prints: a start block, elapsed time and ETA on every log line, a closing
summary with the outputs' paths and the next commands (issue 17, item 13)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from megatron_latentcot.config import load_config
from megatron_latentcot.training.metrics import format_header, format_summary, hms
from tests.test_training import TINY, data_overrides, sotu_data  # noqa: F401  (real-data fixture)


def test_pretrain_prints_start_block_eta_and_summary(sotu_data, tmp_path):  # noqa: F811
    """One real 3-iteration run through the command line."""
    save = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "megatron_latentcot.pretrain", *TINY, *data_overrides(sotu_data),
         "train.train_iters=3", "train.log_interval=1", "train.eval_iters=1", f"train.save={save}"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    header = out[:out.index("iter ")]
    assert re.search(r"== pretraining: vanilla Llama, [\d,]+ parameters \([\d,]+ without embeddings",
                     header)
    assert "TP1 x PP1 x DP1 = 1 process(es) on cpu, fp32" in header
    assert f"8 x 64 = 512 tokens per iteration; 3 iterations = {3 * 512:,} tokens" in header
    for path in (save, save / "metrics.jsonl", save / "tensorboard"):
        assert f" {path}\n" in header
    lines = [line for line in out.splitlines() if line.startswith("iter ")]
    assert len(lines) == 3
    for i, line in enumerate(lines, 1):
        m = re.search(r"\| (\d+)% \| elapsed (\d+:\d\d:\d\d) \| ETA (\d+:\d\d:\d\d)$", line)
        assert m and int(m.group(1)) == round(100 * i / 3), line
    assert lines[-1].endswith("ETA 0:00:00")
    summary = out[out.index("== done: 3 iterations in "):]
    assert f"checkpoint  {save}/iter_0000003" in summary
    assert f"metrics     {save}/metrics.jsonl" in summary
    assert re.search(r"valid +perplexity [\d.]+ \(512 sampled tokens\)", summary)
    assert f"python tools/generate.py {save} --prompt" in summary
    assert f"python tools/evaluate.py {save} --max-tokens 65536" in summary


def test_header_and_summary_cover_resume_and_unsaved_runs():
    """Without train.save the block says nothing is saved and no next commands are offered;
    a resumed run says where it resumed; durations roll over into hours."""
    cfg = load_config(None, ["train.train_iters=10"])
    header = format_header(cfg, (1000, 10), (2, 1, 4), "cuda", 4)
    assert "TP2 x PP1 x DP4 = 8 process(es) on cuda" in header
    assert "resumed     at iteration 4" in header
    assert "nothing is saved" in header
    summary = format_summary(cfg, 6, 3725.4, None, {})
    assert summary.startswith("== done: 6 iterations in 1:02:05")
    assert "checkpoint  none saved" in summary and "next" not in summary
    assert hms(59.6) == "0:01:00"


class _FakeCuda:
    """A CUDA allocator's peak counter, driven by hand (ThroughputWindow on a 'cuda' device)."""

    def __init__(self) -> None:
        self.live, self.peak = 0.0, 0.0

    def allocate(self, gib: float) -> None:
        self.peak = max(self.peak, self.live + gib)

    def reset(self, device=None) -> None:
        self.peak = self.live


def test_throughput_window_counts_only_training_iterations(monkeypatch):
    """Between iterations (an evaluation, a save) the clock runs 1000 s and memory peaks at
    50 GiB: neither shows in the window; each window restarts its peak."""
    import torch

    from megatron_latentcot.training import metrics

    now = [0.0]
    cuda = _FakeCuda()
    monkeypatch.setattr(metrics, "reset_peak_memory", lambda device: cuda.reset())
    monkeypatch.setattr(metrics, "peak_memory_gb", lambda device: cuda.peak)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    window = metrics.ThroughputWindow(torch.device("cuda"), clock=lambda: now[0])
    for seconds, gib in ((2.0, 3.0), (4.0, 5.0)):
        window.begin()
        now[0] += seconds
        cuda.allocate(gib)
        window.end(flops=6e12, tokens=1000)
        now[0] += 1000.0  # evaluation + checkpoint
        cuda.allocate(50.0)
    first = window.report(world_size=2, peak_tflops=0.5)
    assert first["s_per_iter"] == 3.0 and first["tokens_per_s"] == 2000 / 6.0
    assert first["tflops"] == pytest.approx(12e12 / 6.0 / 1e12 / 2)
    assert first["mfu"] == pytest.approx(first["tflops"] / 0.5)
    assert first["peak_mem_gb"] == 5.0 and first["window_iters"] == 2
    window.begin()
    now[0] += 1.0
    cuda.allocate(1.0)
    window.end(flops=1e12, tokens=10)
    second = window.report(world_size=1, peak_tflops=None)
    assert second["s_per_iter"] == 1.0 and second["mfu"] is None
    assert second["peak_mem_gb"] == 1.0  # not the previous window's 5, nor the eval's 50
    with pytest.raises(RuntimeError, match="no iteration"):
        window.report(world_size=1, peak_tflops=None)


def test_slow_evaluation_and_save_leave_the_logged_throughput_alone(sotu_data, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    """A real run whose evaluations and saves each sleep 0.8 s: every logged window's s/iter
    stays within 0.25 s of the measured train_step time (the old window included the sleeps)."""
    import json
    import time

    from megatron_latentcot.config import load_config
    from megatron_latentcot.training.loop import Engine, Trainer

    steps: list[float] = []
    real_step, real_eval, real_save = Engine.train_step, Trainer._eval_and_log, Trainer.save

    def timed_step(self, microbatches):
        start = time.perf_counter()
        out = real_step(self, microbatches)
        steps.append(time.perf_counter() - start)
        return out

    def slow(fn):
        def wrapper(self, *args):
            time.sleep(0.8)
            return fn(self, *args)
        return wrapper

    monkeypatch.setattr(Engine, "train_step", timed_step)
    monkeypatch.setattr(Trainer, "_eval_and_log", slow(real_eval))
    monkeypatch.setattr(Trainer, "save", slow(real_save))
    cfg = load_config(None, TINY + data_overrides(sotu_data) + [
        "train.train_iters=3", "train.log_interval=1", "train.eval_interval=1",
        "train.eval_iters=1", "train.save_interval=1", f"train.save={tmp_path}"])
    result = Trainer(cfg).train()
    assert result["exit_code"] == 0 and len(steps) == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3]
    for row, step in zip(train, steps):
        assert step <= row["s_per_iter"] < step + 0.25, (row["s_per_iter"], step)
        assert row["tokens_per_s"] == pytest.approx(512 / row["s_per_iter"])
