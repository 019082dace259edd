"""``benchmarks/gpu_acceptance.sh --cpu-smoke`` passes, so the GPU acceptance run cannot rot;
its JSON is written whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHECKS = ["a_flex_vs_sdpa", "b_throughput", "c_fsdp2_reduce", "d_resume", "e_methods_flex"]


def test_cpu_smoke_passes_every_check(tmp_path):
    out = tmp_path / "acceptance.json"
    res = subprocess.run(["bash", "benchmarks/gpu_acceptance.sh", "--cpu-smoke", "--threads", "1",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    doc = json.loads(out.read_text())
    failed = [c for c in doc["checks"] if not c["passed"]]
    assert res.returncode == 0 and not failed, (res.stdout[-4000:], res.stderr[-3000:], failed)
    assert doc["mode"] == "cpu-smoke" and doc["passed"] is True
    assert [c["check"] for c in doc["checks"]] == CHECKS
    for check in doc["checks"]:
        assert check["criteria"], check["check"]  # each asserts something
        assert all(c["passed"] and c["value"] is not None for c in check["criteria"])
    flex = doc["checks"][0]["detail"]
    assert flex["fp32"]["plans"] >= 12 and flex["bf16"]["plans"] >= 12
    resume = doc["checks"][3]["detail"]["losses"]
    assert resume["resumed"] == resume["straight"] and len(resume["straight"]) == 20
    assert "PASS" in res.stdout and f"{len(CHECKS)}/{len(CHECKS)} checks passed" in res.stdout


def test_a_failing_check_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    from benchmarks import gpu_acceptance as ga

    def broken(*args):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(ga, "check_fsdp", broken)
    monkeypatch.setattr(ga, "check_flex", lambda *a: {"criteria": [
        ga.criterion("dummy bound", 1.0, "<=", 2.0)], "detail": {}})
    out = tmp_path / "a.json"
    threads = torch.get_num_threads()  # main() sets torch's threads: this process's are kept
    try:
        rc = ga.main(["--cpu-smoke", "--only", "c_fsdp2_reduce,a_flex_vs_sdpa", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(out.read_text())
    assert rc == 1 and doc["passed"] is False
    fsdp, flex = doc["checks"]
    assert fsdp["error"] == "RuntimeError: injected failure" and not fsdp["passed"]
    assert flex["passed"] and flex["criteria"][0]["bound"] == "<= 2"
    assert ga.criterion("x", float("nan"), "<=", 1.0)["passed"] is False
    assert ga.criterion("x", None, ">=", 1.0)["passed"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_mode_without_a_gpu_says_so_in_the_json(tmp_path):
    from benchmarks import gpu_acceptance as ga

    out = tmp_path / "gpu.json"
    assert ga.main(["--out", str(out)]) == 2
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and "no CUDA device" in doc["error"]
