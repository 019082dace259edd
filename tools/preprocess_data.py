"""Tokenize JSONL documents into Megatron-format indexed datasets.

A drop-in for Megatron-LM's ``tools/preprocess_data.py`` (same flags, byte-identical
``<output-prefix>_<key>_document.bin/.idx`` for the same input and tokenizer) that also

* reads ``.jsonl``, ``.jsonl.gz`` and ``.jsonl.zst`` and several inputs in order,
* streams: at most ``2 * workers + 2`` chunks are in flight, so memory stays flat with corpus size
  (Megatron-LM's ``Pool.imap`` over the file queues the whole input when workers lag),
* reports a malformed line as ``file:line`` and stops, or skips and counts it with
  ``--skip-bad-lines``, never dropping one silently,
* writes atomically (an interrupted run leaves no ``.idx``) and records the tokenizer fingerprint
  in ``<prefix>_<key>_document.meta.json``.

Example::

    python tools/preprocess_data.py --input corpus/train.jsonl --output-prefix data/sotu \\
        --tokenizer-type sentencepiece --tokenizer-model tok.model --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_latentcot.data.tokenizer import TokenizerError, build_tokenizer  # noqa: E402

# Our names plus Megatron-LM's for the same backends.
TOKENIZER_TYPES: dict[str, str] = {
    "sentencepiece": "sentencepiece",
    "spm": "sentencepiece",
    "huggingface": "huggingface",
    "hf": "huggingface",
    "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece",
    "HuggingFaceTokenizer": "huggingface",
}
CHUNK_LINES = 1024
CHUNK_BYTES = 1 << 20
MAX_REPORTED_BAD_LINES = 20


class PreprocessError(Exception):
    """A problem with the inputs, tokenizer or output; the message says which and where."""


# --------------------------------------------------------------------------- input


def open_input(path: str) -> IO[bytes]:
    """Binary line reader for plain, gzip (``.gz``) or zstandard (``.zst``) JSONL."""
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.endswith(".zst"):
            import zstandard

            raw = open(path, "rb")
            reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
            return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type]
        return open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise PreprocessError(f"{path}: input file not found") from None
    except IsADirectoryError:
        raise PreprocessError(f"{path}: is a directory, expected a JSONL file") from None
    except OSError as e:
        raise PreprocessError(f"{path}: cannot open input ({e.strerror or e})") from None


Chunk = tuple[str, int, list[bytes]]  # (file, number of its first line, raw lines)


def read_chunks(paths: list[str], stats: Stats) -> Iterator[Chunk]:
    """Lines of every input in order, grouped into chunks of about ``CHUNK_BYTES``."""
    for path in paths:
        with open_input(path) as f:
            lines: list[bytes] = []
            size = 0
            first = 1
            lineno = 0
            try:
                for lineno, line in enumerate(f, start=1):  # noqa: B007 (used after the loop)
                    lines.append(line)
                    size += len(line)
                    if len(lines) >= CHUNK_LINES or size >= CHUNK_BYTES:
                        stats.bytes_read += size
                        yield path, first, lines
                        lines, size, first = [], 0, lineno + 1
            except (OSError, EOFError, ValueError) as e:
                # gzip.BadGzipFile, zstd errors, truncated archives
                raise PreprocessError(f"{path}:{lineno + 1}: cannot decompress/read input "
                                      f"({e})") from None
            if lines:
                stats.bytes_read += size
                yield path, first, lines
            stats.lines += lineno


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, keys: list[str], append_eod: bool, dtype: str,
                 limit: int) -> None:
    _WORKER.update(tokenizer=tokenizer, keys=keys, append_eod=append_eod,
                   dtype=np.dtype(dtype), limit=limit)


def _describe(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def encode_chunk(chunk: Chunk) -> dict[str, Any]:
    """Parse and tokenize one chunk of lines (runs in a worker).

    Returns the tokens of each key as one flat array plus per-document lengths (one pickle per
    chunk, not one per document), the line numbers and messages of malformed lines, and the
    byte count of the good lines.
    """
    path, first, lines = chunk
    tok = _WORKER["tokenizer"]
    keys: list[str] = _WORKER["keys"]
    texts: dict[str, list[str]] = {k: [] for k in keys}
    bad: list[tuple[int, str]] = []
    good_bytes = 0
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as e:
            bad.append((first + i, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
            continue
        except ValueError as e:
            msg = "empty line" if not line.strip() else f"invalid JSON ({e})"
            bad.append((first + i, f"{msg}; expected one JSON object per line"))
            continue
        if not isinstance(obj, dict):
            bad.append((first + i, f"expected a JSON object, got {_describe(obj)}"))
            continue
        problem = None
        for key in keys:
            if key not in obj:
                problem = f"missing key {key!r} (keys present: {sorted(obj)[:8]})"
            elif not isinstance(obj[key], str):
                problem = f"key {key!r} is {_describe(obj[key])}, expected a string"
            if problem:
                break
        if problem:
            bad.append((first + i, problem))
            continue
        for key in keys:
            texts[key].append(obj[key])
        good_bytes += len(line)
    lineno_of_good = [first + i for i in range(len(lines))]
    if bad:
        bad_set = {n for n, _ in bad}
        lineno_of_good = [n for n in lineno_of_good if n not in bad_set]
    out: dict[str, Any] = {"bad": bad, "bytes": good_bytes, "docs": len(lineno_of_good)}
    dtype, limit, eod = _WORKER["dtype"], _WORKER["limit"], tok.eod
    for key in keys:
        # One document at a time: batch encoders (sentencepiece, HF) start threads of their
        # own, which oversubscribes the cores the worker processes already use.
        encoded = [tok.encode(t) for t in texts[key]]
        if _WORKER["append_eod"]:  # Megatron-LM appends EOD to non-empty documents only
            encoded = [ids + [eod] if ids else ids for ids in encoded]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        total = int(lengths.sum())
        try:  # numpy refuses ids that do not fit the dtype; the max check catches the rest
            flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=total)
            ok = not flat.size or int(flat.max()) < limit
        except OverflowError:
            ok = False
        if not ok:
            flat64 = np.fromiter(itertools.chain.from_iterable(encoded), np.int64, count=total)
            pos = int(np.argmax((flat64 >= limit) | (flat64 < 0)))
            doc = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
            raise PreprocessError(
                f"{path}:{lineno_of_good[doc]}: token id {int(flat64[pos])} of key {key!r} is "
                f"outside [0, {limit}) (vocabulary size / {dtype.name} range): the tokenizer "
                "reports a vocab_size smaller than the ids it emits"
            )
        out[key] = (flat, lengths)
    return out


# --------------------------------------------------------------------------- main process


@dataclass
class Stats:
    start: float = field(default_factory=time.perf_counter)
    lines: int = 0
    bytes_read: int = 0
    docs: int = 0
    empty_docs: int = 0
    tokens: int = 0
    good_bytes: int = 0
    bad_lines: int = 0
    next_report: int = 0

    def rates(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.docs / dt:,.1f} docs/s, {self.good_bytes / dt / 2**20:,.2f} MB/s, "
                f"{self.tokens / dt:,.0f} tokens/s")


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
    g.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES),
                   help="sentencepiece (.model) or huggingface (tokenizer.json); Megatron-LM's "
                        "names are accepted too")
    g.add_argument("--tokenizer-model", required=True, help="path of the tokenizer file")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document id to every non-empty document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.{bin,idx,meta.json}")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--partitions", type=int, default=1,
                   help="accepted for compatibility; streaming makes partition files unnecessary")
    g.add_argument("--keep-sequential-samples", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--log-interval", type=int, default=1000,
                   help="report progress every this many documents")
    args = p.parse_args(argv)
    if args.split_sentences or args.keep_newlines:
        p.error("--split-sentences/--keep-newlines are not supported: sentence-level datasets "
                "are for BERT-style training; this tool writes document-level datasets")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.partitions < 1:
        p.error(f"--partitions must be >= 1, got {args.partitions}")
    if args.log_interval < 1:
        p.error(f"--log-interval must be >= 1, got {args.log_interval}")
    if len(set(args.json_keys)) != len(args.json_keys):
        p.error(f"--json-keys has duplicates: {args.json_keys}")
    return args


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def _check_inputs(paths: list[str]) -> None:
    for path in paths:
        if not os.path.exists(path):
            raise PreprocessError(f"{path}: input file not found")
        if os.path.isdir(path):
            raise PreprocessError(f"{path}: is a directory, expected a JSONL file")
        if not os.access(path, os.R_OK):
            raise PreprocessError(f"{path}: input file is not readable")


def _check_output_dir(prefix: str) -> None:
    parent = os.path.dirname(os.path.abspath(prefix))
    probe = parent
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise PreprocessError(f"{prefix}: output location {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PreprocessError(f"{prefix}: output directory {probe} is not writable")


def _report_bad(stats: Stats, path: str, lineno: int, msg: str, skip: bool) -> None:
    where = f"{path}:{lineno}"
    if not skip:
        raise PreprocessError(f"{where}: {msg} (pass --skip-bad-lines to skip and count such "
                              "lines)")
    stats.bad_lines += 1
    if stats.bad_lines <= MAX_REPORTED_BAD_LINES:
        print(f"warning: skipping {where}: {msg}", file=sys.stderr)
    elif stats.bad_lines == MAX_REPORTED_BAD_LINES + 1:
        print("warning: more bad lines skipped; the final summary counts them all",
              file=sys.stderr)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Preprocess as ``args`` say; return the summary (also printed). Raises PreprocessError."""
    _check_inputs(args.input)
    _check_output_dir(args.output_prefix)
    try:
        tokenizer = build_tokenizer(TOKENIZER_TYPES[args.tokenizer_type], args.tokenizer_model)
    except TokenizerError as e:
        raise PreprocessError(f"tokenizer: {e}") from None
    from megatron_latentcot.data.indexed import IndexedDatasetError, optimal_dtype

    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size))
    limit = min(tokenizer.vocab_size, int(np.iinfo(dtype).max) + 1)
    if args.partitions > 1:
        print(f"note: --partitions {args.partitions} ignored: input is streamed through one "
              f"ordered pool of {args.workers} workers", file=sys.stderr)
    stats = Stats(next_report=args.log_interval)
    print(f"tokenizer {tokenizer.tokenizer_type} {args.tokenizer_model} (vocab "
          f"{tokenizer.vocab_size}, eod {tokenizer.eod}) -> {dtype.name} tokens; "
          f"{args.workers} worker(s)", file=sys.stderr)
    # Fork the workers before the main process imports megatron-core/torch (via the writer):
    # they then need only the tokenizer and numpy, and the process tree stays small.
    pool = multiprocessing.Pool(
        args.workers, initializer=_init_worker,
        initargs=(tokenizer, list(args.json_keys), bool(args.append_eod), dtype.name, limit))
    writers: dict[str, Any] = {}
    try:
        stats.start = time.perf_counter()
        pending: deque[tuple[Chunk, Any]] = deque()
        max_in_flight = 2 * args.workers + 2
        chunks = read_chunks(args.input, stats)

        def refill() -> None:
            while len(pending) < max_in_flight:
                chunk = next(chunks, None)
                if chunk is None:
                    return
                pending.append((chunk, pool.apply_async(encode_chunk, (chunk,))))

        refill()  # the workers tokenize while this process imports megatron-core for the writer
        from megatron_latentcot.data.indexed import IndexedWriter

        for key in args.json_keys:
            writers[key] = IndexedWriter(output_prefix(args.output_prefix, key),
                                         tokenizer.vocab_size, dtype.type)
        while pending:
            chunk, result = pending.popleft()
            _consume(chunk, result.get(), args, writers, stats)
            refill()
        if stats.lines == 0:
            raise PreprocessError(f"{', '.join(args.input)}: input is empty (no JSON lines)")
        if stats.docs == 0:
            raise PreprocessError(f"{', '.join(args.input)}: no documents left after skipping "
                                  f"{stats.bad_lines} bad line(s)")
        pool.close()
        meta = {
            "tokenizer_type": tokenizer.tokenizer_type,
            "tokenizer_model": os.path.abspath(args.tokenizer_model),
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "append_eod": bool(args.append_eod),
            "inputs": [os.path.abspath(p) for p in args.input],
            "skipped_lines": stats.bad_lines,
            "created_by": "megatron_latentcot tools/preprocess_data.py",
        }
        outputs = {}
        for key, writer in writers.items():
            info = writer.finalize({**meta, "json_key": key})
            outputs[key] = info.prefix
    except IndexedDatasetError as e:
        raise PreprocessError(str(e)) from None
    finally:
        pool.terminate()
        pool.join()
        for writer in writers.values():
            if not writer.done:
                writer.abort()
    elapsed = time.perf_counter() - stats.start
    summary = {
        "documents": stats.docs, "empty_documents": stats.empty_docs, "tokens": stats.tokens,
        "bytes": stats.good_bytes, "lines": stats.lines, "skipped_lines": stats.bad_lines,
        "seconds": elapsed, "docs_per_s": stats.docs / max(elapsed, 1e-9),
        "mb_per_s": stats.good_bytes / 2**20 / max(elapsed, 1e-9),
        "tokens_per_s": stats.tokens / max(elapsed, 1e-9), "dtype": dtype.name,
        "workers": args.workers, "outputs": outputs,
    }
    print(f"done: {stats.docs:,} documents ({stats.empty_docs:,} empty), {stats.tokens:,} "
          f"tokens, {stats.good_bytes / 2**20:,.2f} MB in {elapsed:.2f} s ({stats.rates()}); "
          f"skipped {stats.bad_lines:,} bad line(s); {dtype.name} tokens")
    for key, prefix in outputs.items():
        print(f"  {key}: {prefix}.bin / .idx / .meta.json")
    return summary


def _consume(chunk: Chunk, out: dict[str, Any], args: argparse.Namespace,
             writers: dict[str, Any], stats: Stats) -> None:
    path = chunk[0]
    for lineno, msg in out["bad"]:
        _report_bad(stats, path, lineno, msg, args.skip_bad_lines)
    for key, writer in writers.items():
        flat, lengths = out[key]
        writer.add_documents(flat, lengths, checked=True)
    first = out[args.json_keys[0]][1]
    stats.docs += out["docs"]
    stats.empty_docs += int((first == 0).sum())
    stats.tokens += int(sum(int(out[k][0].size) for k in args.json_keys))
    stats.good_bytes += out["bytes"]
    if stats.docs >= stats.next_report:
        total = sum(os.path.getsize(p) for p in args.input)
        pct = ""
        if not any(p.endswith((".gz", ".zst")) for p in args.input) and total:
            pct = f"[{100 * stats.bytes_read / total:5.1f}%] "
        print(f"{pct}{stats.docs:,} docs, {stats.tokens:,} tokens ({stats.rates()})",
              file=sys.stderr)
        stats.next_report = (stats.docs // args.log_interval + 1) * args.log_interval


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (errors print one line, status 1)."""
    args = parse_args(argv)
    try:
        run(args)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written (temporary files removed)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
