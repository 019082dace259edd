"""``tools/compare_flops.py``: compare training runs by FLOPs, or tabulate analytic FLOPs per
method (:mod:`megatron_latentcot.analysis.compare` says what each mode computes and writes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_latentcot.analysis.compare import (
    DEFAULT_OUT,
    PAPER_TOKENS,
    PRESETS,
    CompareError,
    analytic_setups,
    compare_runs,
    write_analytic,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Quality against compute: compare training runs by "
                                "FLOPs, or tabulate analytic FLOPs per method.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--runs", nargs="+", type=Path, metavar="DIR", help="training runs' save dirs")
    mode.add_argument("--analytic", action="store_true", help="FLOPs per token per method, no runs")
    p.add_argument("--reference", metavar="RUN", help="runs: the run FLOPs ratios are against "
                   "(default: the vanilla run with the fewest training FLOPs)")
    p.add_argument("--preset", action="append", choices=list(PRESETS),
                   help="analytic: a paper-scale shape (repeatable; default: all unless --config)")
    p.add_argument("--config", help="analytic: a YAML config (model, seq, K, adaptive loss)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="analytic: override a --config field (repeatable)")
    p.add_argument("--vocab", type=int, default=None,
                   help="embedding rows (default: model.vocab_size, else the padded tokenizer; 50304 "
                        "for presets)")
    p.add_argument("--max-steps", type=int, default=None, help="analytic: K (default: config / 4)")
    p.add_argument("--steps-dist", action="append", metavar="P1,...,PK",
                   help="analytic: fractions of tokens whose last step is 1..K, one adaptive row "
                        "each (repeatable; default uniform)")
    p.add_argument("--tokens", type=int, default=PAPER_TOKENS,
                   help=f"analytic: training tokens for the totals (default {PAPER_TOKENS:,})")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where tables and PNGs go")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.analytic:
            setups = analytic_setups(args.config, args.set, args.preset, args.vocab, args.max_steps)
            write_analytic(setups, args.steps_dist, args.tokens, args.out_dir)
        else:
            compare_runs(args.runs, args.out_dir, args.vocab, args.reference)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
