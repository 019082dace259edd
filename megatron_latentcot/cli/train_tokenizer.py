"""Train a sentencepiece tokenizer (BPE or unigram) on JSONL or plain-text files.

Usage::

    python tools/train_tokenizer.py --input train.jsonl --output-prefix out/sotu_bpe8k \\
        --vocab-size 8192 [--model-type bpe|unigram] [--no-byte-fallback] [--json-key text]

Writes ``PREFIX.model``, ``PREFIX.vocab`` and ``PREFIX.json`` (arguments, input hashes, timing);
what the training does and why: :mod:`megatron_latentcot.data.tokenizer_training`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_latentcot.data.tokenizer_training import (
    MODEL_TYPES,
    TokenizerTrainingError,
    train_sentencepiece,
)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, type=Path,
                   help="JSONL (.jsonl/.json: one object per line) or plain text files")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text")
    p.add_argument("--output-prefix", required=True, type=Path,
                   help="writes PREFIX.model, PREFIX.vocab and PREFIX.json")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="encode unseen characters as UTF-8 bytes (lossless; default on)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--normalization", default="identity",
                   help="sentencepiece normalization rule (identity keeps text as is; nmt_nfkc)")
    p.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--user-defined-symbols", default="",
                   help="comma-separated pieces always kept whole (e.g. '<pause>')")
    p.add_argument("--max-sentences", type=int, default=0,
                   help="train on a seeded sample of this many lines (0: all)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with one clear message on bad input)."""
    args = build_parser().parse_args(argv)
    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    t0 = time.perf_counter()
    try:
        model = train_sentencepiece(
            args.input, args.output_prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, byte_fallback=args.byte_fallback,
            json_key=args.json_key, character_coverage=args.character_coverage,
            normalization=args.normalization, split_digits=args.split_digits,
            user_defined_symbols=symbols, max_sentences=args.max_sentences,
            num_threads=args.num_threads, seed=args.seed, verbose=args.verbose,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except TokenizerTrainingError as exc:
        print(f"train_tokenizer: error: {exc}", file=sys.stderr)
        return 2
    print(f"total {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
