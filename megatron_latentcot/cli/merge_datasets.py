"""Merge several Megatron-format datasets into one (Megatron-LM's ``tools/merge_datasets.py``).

``--input`` is either a directory, whose ``<name>.idx``/``<name>.bin`` pairs are merged in sorted
name order (as Megatron-LM does), or one or more prefixes, merged in the order given. Every input
is validated first; inputs must share a token dtype and, where they record one, a tokenizer. An
input without ``.meta.json`` (e.g. written by Megatron-LM) cannot prove its tokenizer: its token
ids are checked against the vocabulary the other inputs record (or ``--vocab-size``), and a
warning names it when no vocabulary is known. The output is written atomically and gets a
``.meta.json`` when the inputs had one.

Example::

    python tools/merge_datasets.py --input data/shards --output-prefix data/all_text_document
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from megatron_latentcot.data.indexed import (
    IndexedDatasetError,
    IndexedWriter,
    meta_path,
    read_meta,
    validate_indexed,
)


class MergeError(Exception):
    """Inputs that cannot be merged; the message names the file and the reason."""


def find_prefixes(inputs: list[str], output_prefix: str) -> list[str]:
    """Dataset prefixes named by ``inputs`` (a directory or prefixes), without the output."""
    out_abs = os.path.abspath(output_prefix)
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        directory = inputs[0]
        names = sorted(n[: -len(".idx")] for n in os.listdir(directory) if n.endswith(".idx"))
        bins = {n[: -len(".bin")] for n in os.listdir(directory) if n.endswith(".bin")}
        for n in sorted(bins - set(names)):
            raise MergeError(f"{os.path.join(directory, n)}.bin has no .idx beside it "
                             "(an interrupted preprocessing run?)")
        prefixes = [os.path.join(directory, n) for n in names]
        prefixes = [p for p in prefixes if os.path.abspath(p) != out_abs]
        if not prefixes:
            raise MergeError(f"{directory}: no .idx/.bin datasets to merge")
        return prefixes
    for p in inputs:
        if p.endswith((".bin", ".idx")):
            raise MergeError(f"{p}: pass the dataset prefix, without .bin/.idx")
        if os.path.abspath(p) == out_abs:
            raise MergeError(f"{p}: the output prefix cannot also be an input")
    return list(inputs)


def _target_vocab(prefixes: list[str], metas: list[dict[str, Any] | None],
                  vocab_size: int | None) -> int | None:
    """The one vocabulary size the metadata and ``--vocab-size`` agree on (None: unknown)."""
    sizes = {meta_path(p): int(m["vocab_size"]) for p, m in zip(prefixes, metas)
             if m is not None and m.get("vocab_size") is not None}
    if vocab_size is not None:
        sizes["--vocab-size"] = vocab_size
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{k} says {v}" for k, v in sizes.items())
        raise MergeError(f"inputs disagree on the vocabulary size: {detail}")
    return next(iter(sizes.values()), None)


def merge(prefixes: list[str], output_prefix: str,
          vocab_size: int | None = None) -> dict[str, Any]:
    """Concatenate ``prefixes`` into ``output_prefix``; return the merged dataset's facts.

    ``unverified`` in the result lists inputs whose tokenizer nothing could check (no metadata
    and no known vocabulary).
    """
    if not prefixes:
        raise MergeError("nothing to merge: no input datasets")
    infos = [validate_indexed(p) for p in prefixes]
    dtypes = {i.dtype for i in infos}
    if len(dtypes) > 1:
        detail = ", ".join(f"{i.prefix} ({i.dtype})" for i in infos)
        raise MergeError(f"inputs have different token dtypes, so different tokenizers: {detail}")
    metas = [read_meta(p) for p in prefixes]
    fingerprints = {m.get("tokenizer_fingerprint") for m in metas if m is not None}
    if len(fingerprints) > 1:
        detail = ", ".join(f"{p} ({str(m.get('tokenizer_fingerprint'))[:12]})"
                           for p, m in zip(prefixes, metas) if m is not None)
        raise MergeError(f"inputs were built with different tokenizers: {detail}")
    known = next((m for m in metas if m is not None), None)
    dtype = np.dtype(infos[0].dtype)
    vocab = _target_vocab(prefixes, metas, vocab_size)
    unverified = [p for p, m in zip(prefixes, metas) if m is None]
    if vocab is not None:  # ids beyond the vocabulary: another tokenizer's dataset
        for p in unverified:
            try:
                validate_indexed(p, vocab_size=vocab, check_tokens=True)
            except IndexedDatasetError as e:
                source = "--vocab-size" if known is None else "the other inputs' .meta.json"
                raise MergeError(f"{e}; {source} gives {vocab} ids") from None
        unverified = []
    with IndexedWriter(output_prefix, vocab or int(np.iinfo(dtype).max) + 1,
                       dtype=dtype.type) as w:
        for info in infos:
            w.add_index(info)
        meta = None
        if known is not None:
            keep = ("tokenizer_type", "tokenizer_model", "tokenizer_fingerprint", "vocab_size",
                    "eod", "append_eod", "json_key")
            meta = {k: known[k] for k in keep if k in known}
            meta.update(merged_from=[os.path.abspath(p) for p in prefixes],
                        created_by="megatron_latentcot tools/merge_datasets.py")
        info = w.finalize(meta)
    return {"prefix": info.prefix, "inputs": len(prefixes), "documents": info.documents,
            "sequences": info.sequences, "tokens": info.tokens, "dtype": info.dtype,
            "unverified": unverified}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (errors print one line, status 1)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="a directory of .bin/.idx pairs, or one or more dataset prefixes")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary of the tokenizer the inputs were built with: every input "
                   "without .meta.json is checked against it")
    p.add_argument("--multimodal", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.multimodal:
        p.error("--multimodal datasets are not supported")
    try:
        prefixes = find_prefixes(args.input, args.output_prefix)
        result = merge(prefixes, args.output_prefix, args.vocab_size)
    except (MergeError, IndexedDatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result["unverified"]:
        print(f"warning: {', '.join(result['unverified'])}: no .meta.json and no known "
              "vocabulary, so the tokenizer was not checked (pass --vocab-size)", file=sys.stderr)
    print(f"merged {result['inputs']} datasets -> {result['prefix']}.bin/.idx: "
          f"{result['documents']:,} documents, {result['tokens']:,} {result['dtype']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
