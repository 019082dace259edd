"""What training prints: a start block, elapsed time and ETA on every log line, a closing
summary with the outputs' paths and the next commands (issue 17, item 13)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
