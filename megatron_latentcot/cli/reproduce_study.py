"""``tools/reproduce_study.py``: the small-scale reproduction study's command line
(:mod:`megatron_latentcot.analysis.study` says what each step does and writes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_latentcot.analysis.study import BASE_ITERS, StudyError, StudyOptions, run_study


def build_parser() -> argparse.ArgumentParser:
    d = StudyOptions()  # the defaults
    p = argparse.ArgumentParser(description="Small-scale reproduction study (issue #11): every "
                                "method on the default corpus, one command.")
    p.add_argument("--budget", type=float, default=d.budget,
                   help=f"scales every run's iterations (1.0 = {BASE_ITERS}; ~80 CPU-min on 2 shared "
                        "CPU cores)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per process (1: robust on a shared 2-core machine)")
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--runs-dir", type=Path, default=d.runs_dir)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="default data_cache/reproduce_small_v<vocab>")
    p.add_argument("--docs-dir", type=Path, default=d.docs_dir, help="where results_*.png go")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--only", nargs="+", metavar="RUN", help="train/evaluate only these runs")
    p.add_argument("--force", action="store_true", help="redo evaluation of finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--analyze-only", action="store_true",
                   help="skip data/training/evaluation: tables and plots from --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_study(StudyOptions(**vars(args)))
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
