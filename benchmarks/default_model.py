"""The default models end to end: train, evaluate, and where the adaptive one thinks.

    bash examples/quickstart.sh            # once: the corpus, tokenizer and indexed datasets
    python -m benchmarks.default_model [--configs tiny tiny_adaptive] [--reuse] [--max-tokens N]

For each ``examples/configs/<config>.yaml``: trains it (``megatron_latentcot.pretrain``, into the
config's ``train.save``; ``--reuse`` keeps a run that already reached its last iteration),
evaluates the final checkpoint with ``tools/evaluate.py`` (validation and held-out perplexity,
per token and per byte, mean latent steps, the LAMBADA-style fixture) and, for latent methods,
draws ``tools/plot_latent_steps.py`` on the first validation address (``--figures`` copies the
pictures, e.g. into ``docs/``). Wall times of every stage, the results and the steps histogram
go to one JSON (default ``benchmarks/results/default_model.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import warn_if_busy, write_json

REPO = Path(__file__).resolve().parents[1]
LAMBADA = "tests/fixtures/lambada_sotu.jsonl"
CORPUS = "data_cache/corpus.json"


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` in the repository, output to ``log``; returns wall seconds or exits."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


def _finished(run_dir: Path, iters: int) -> bool:
    latest = run_dir / "latest"
    return latest.is_file() and latest.read_text().strip() == f"iter_{iters:07d}"


def default_model(config: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    from megatron_latentcot.config import load_config

    path = f"examples/configs/{config}.yaml"
    cfg = load_config(REPO / path, [])
    run_dir = REPO / cfg.train.save
    run = cfg.train.save  # as given (the tools run in the repository): the pictures' titles
    latent = cfg.latent.method != "vanilla"
    out: dict[str, Any] = {"config": path, "method": cfg.latent.method,
                           "max_steps": cfg.latent.max_steps if latent else 1,
                           "run": cfg.train.save}
    if args.reuse and _finished(run_dir, cfg.train.train_iters):
        before = json.loads(args.out.read_text()) if args.out.is_file() else {}
        out["train_wall_s"] = before.get("runs", {}).get(config, {}).get("train_wall_s")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        out["train_wall_s"] = _run([sys.executable, "-m", "megatron_latentcot.pretrain",
                                    "--config", path], logs / f"{config}_train.log")
    eval_dir = logs / f"{config}_eval"
    cmd = [sys.executable, "tools/evaluate.py", run, "--lambada", LAMBADA,
           "--output-dir", str(eval_dir)]
    if args.max_tokens:
        cmd += ["--max-tokens", str(args.max_tokens)]
    out["eval_wall_s"] = _run(cmd, logs / f"{config}_eval.log")
    results = json.loads((eval_dir / "results.json").read_text())
    out["eval"] = {"settings": results["settings"], "perplexity": results["perplexity"],
                   "lambada": results["lambada"]}
    if latent:
        valid = json.loads((REPO / CORPUS).read_text())["valid"]
        fig = logs / f"{config}_steps"
        out["plot_wall_s"] = _run([sys.executable, "tools/plot_latent_steps.py", run,
                                   "--jsonl", valid, "--doc", "0", "--max-tokens",
                                   str(args.plot_tokens), "--output-dir", str(fig)],
                                  logs / f"{config}_plot.log")
        steps = json.loads((fig / "latent_steps.json").read_text())
        out["steps_first_valid_address"] = {k: steps[k] for k in (
            "tokens", "mean_steps", "histogram", "mean_loss_by_steps")}
        if args.figures:
            args.figures.mkdir(parents=True, exist_ok=True)
            for name in ("latent_steps_tokens.png", "latent_steps_vs_loss.png",
                         "latent_steps_hist.png"):
                shutil.copy(fig / name, args.figures / name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "tiny_adaptive"])
    p.add_argument("--reuse", action="store_true",
                   help="keep runs that already finished (and their training time in --out)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="evaluate the first N tokens of each dataset (default: all)")
    p.add_argument("--plot-tokens", type=int, default=160)
    p.add_argument("--figures", type=Path, default=None, help="copy the pictures here")
    p.add_argument("--logs", type=Path, default=Path("runs/default_model"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/default_model.json"))
    args = p.parse_args(argv)
    if not (REPO / CORPUS).is_file():
        raise SystemExit(f"{CORPUS} not found: run `bash examples/quickstart.sh` first (it "
                         "prepares the corpus, tokenizer and datasets)")
    warn_if_busy()
    logs = args.logs if args.logs.is_absolute() else REPO / args.logs
    logs.mkdir(parents=True, exist_ok=True)
    runs = {}
    for config in args.configs:
        print(f"== {config}", flush=True)
        runs[config] = default_model(config, args, logs)
        print(json.dumps({k: v for k, v in runs[config].items() if k != "eval"}), flush=True)
    threads = os.environ.get("OMP_NUM_THREADS")
    path = write_json(args.out, "default_model", torch.device("cpu"), args,
                      {"omp_num_threads": threads, "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
