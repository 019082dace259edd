"""Tokenize JSONL documents into Megatron-format indexed datasets.

A drop-in for Megatron-LM's ``tools/preprocess_data.py`` (same flags and tokenizer names,
byte-identical ``<output-prefix>_<key>_document.bin/.idx`` for the same input and tokenizer,
``--partitions`` included) that runs at the tokenizer's own speed, in a fraction of the memory,
without importing torch or megatron-core (see ``megatron_latentcot/data/preprocess.py``). It
also

* reads ``.jsonl``, ``.jsonl.gz`` and ``.jsonl.zst``, several inputs in order,
* streams: memory stays flat with corpus size,
* reports a malformed line as ``file:line`` and stops, or skips and counts it with
  ``--skip-bad-lines``, never dropping one silently,
* shows progress (bytes read, tokens/s, ETA) on a terminal or for inputs over 1 GiB,
* writes atomically (an interrupted run leaves no ``.idx``) and records the tokenizer fingerprint
  in ``<prefix>_<key>_document.meta.json``.

``--workers`` is the number of encoding threads. Example::

    python tools/preprocess_data.py --input corpus/train.jsonl --output-prefix data/sotu \\
        --tokenizer-type sentencepiece --tokenizer-model tok.model --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from megatron_latentcot.data.preprocess import (
    PreprocessError,
    PreprocessOptions,
    pin_malloc_mmap_threshold,
    preprocess,
)
from megatron_latentcot.data.tokenizer import (
    TOKENIZER_TYPES,
    TokenizerError,
    build_tokenizer,
    canonical_tokenizer_type,
)


def _tokenizer_type(name: str) -> str:
    try:
        canonical_tokenizer_type(name)
    except TokenizerError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tokenize JSONL into Megatron-format .bin/.idx datasets "
                    "(Megatron-LM's tools/preprocess_data.py interface).")
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL file(s), plain, .gz or .zst; several are concatenated in order")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to extract from each JSON object (one dataset per key)")
    g.add_argument("--split-sentences", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--keep-newlines", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--lang", default="english", help=argparse.SUPPRESS)
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines (invalid JSON, missing key, non-string text) and "
                        "count them instead of stopping at the first one")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, type=_tokenizer_type,
                   metavar="{" + ",".join(TOKENIZER_TYPES) + "}",
                   help="sentencepiece (.model), huggingface (tokenizer.json) or Megatron-LM's "
                        "names for them; GPT2BPETokenizer takes --vocab-file/--merge-file")
    g.add_argument("--tokenizer-model", default=None, help="path of the tokenizer file")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: encoder.json/vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: vocab.bpe/merges.txt")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document id to every non-empty document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.{bin,idx,meta.json}")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="encoding threads")
    g.add_argument("--partitions", type=int, default=1,
                   help="Megatron-LM's partitions: line i goes to partition i %% N and the "
                        "partitions are concatenated (same output order as Megatron-LM; done in "
                        "one pass, no partition files are left behind)")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="with --partitions: contiguous partitions, i.e. the input's order")
    g.add_argument("--log-interval", type=int, default=None,
                   help="a progress line every this many documents (default: a live line on a "
                        "terminal, or one a minute for inputs over 1 GiB)")
    args = p.parse_args(argv)
    if args.split_sentences or args.keep_newlines:
        p.error("--split-sentences/--keep-newlines are not supported: sentence-level datasets "
                "are for BERT-style training; this tool writes document-level datasets")
    for flag in ("workers", "partitions", "log_interval"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if len(set(args.json_keys)) != len(args.json_keys):
        p.error(f"--json-keys has duplicates: {args.json_keys}")
    if args.tokenizer_model is None and canonical_tokenizer_type(args.tokenizer_type) != "gpt2bpe":
        p.error(f"--tokenizer-model is required for --tokenizer-type {args.tokenizer_type}")
    return args


def _check_inputs(paths: list[str]) -> None:
    for path in paths:
        if not os.path.exists(path):
            raise PreprocessError(f"{path}: input file not found")
        if os.path.isdir(path):
            raise PreprocessError(f"{path}: is a directory, expected a JSONL file")
        if not os.access(path, os.R_OK):
            raise PreprocessError(f"{path}: input file is not readable")


def _check_output_dir(prefix: str) -> None:
    probe = os.path.dirname(os.path.abspath(prefix))
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise PreprocessError(f"{prefix}: output location {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PreprocessError(f"{prefix}: output directory {probe} is not writable")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Preprocess as ``args`` say; return the summary (also printed). Raises PreprocessError."""
    _check_inputs(args.input)
    _check_output_dir(args.output_prefix)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model,
                                    vocab_file=args.vocab_file, merge_file=args.merge_file)
    except TokenizerError as e:
        raise PreprocessError(f"tokenizer: {e}") from None
    print(f"tokenizer {args.tokenizer_type} {tokenizer.path} (vocab {tokenizer.vocab_size}, "
          f"eod {tokenizer.eod}); {args.workers} worker thread(s)", file=sys.stderr)
    opts = PreprocessOptions(
        inputs=list(args.input), output_prefix=args.output_prefix,
        json_keys=list(args.json_keys), append_eod=bool(args.append_eod), workers=args.workers,
        partitions=args.partitions, keep_sequential_samples=args.keep_sequential_samples,
        skip_bad_lines=args.skip_bad_lines, log_interval=args.log_interval)
    s = preprocess(opts, tokenizer)
    print(f"done: {s['documents']:,} documents ({s['empty_documents']:,} empty), "
          f"{s['tokens']:,} tokens, {s['bytes'] / 2**20:,.2f} MB in {s['seconds']:.2f} s "
          f"({s['rates']}); skipped {s['skipped_lines']:,} bad line(s); {s['dtype']} tokens")
    for key, prefix in s["outputs"].items():
        print(f"  {key}: {prefix}.bin / .idx / .meta.json")
    return s


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (errors print one line, status 1)."""
    args = parse_args(argv)
    if argv is None:  # a process of its own: tune its allocator (library callers keep theirs)
        pin_malloc_mmap_threshold()
    # HF tokenizers encode batches on a process-wide pool: size it to --workers before its
    # first use (sentencepiece takes the thread count per call).
    rayon = "RAYON_NUM_THREADS" not in os.environ
    if rayon:
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    try:
        run(args)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written (temporary files removed)", file=sys.stderr)
        return 130
    finally:
        if rayon:
            del os.environ["RAYON_NUM_THREADS"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
