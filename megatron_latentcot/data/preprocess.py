"""Tokenize JSONL documents into Megatron-format datasets at the tokenizer's own speed.

The engine of ``tools/preprocess_data.py``; byte-identical to Megatron-LM's tool for the same
input, tokenizer and ``--partitions`` (tests/golden), and importing neither torch nor
megatron-core: the tokenizer, numpy and ``indexed_writer`` are all it needs.

How (each point measured on a 2-core machine, see benchmarks/preprocess.py):

* **Threads, not processes.** The main thread reads the input in chunks of about
  ``CHUNK_BYTES`` of lines (plain, ``.gz``, ``.zst``); ``workers`` threads each parse one chunk's
  JSON and encode all its texts in one batch call, which releases the GIL (sentencepiece encodes
  single-threaded per call, so ``workers`` chunks run at once and a thread's Python work
  overlaps the others' encoding; HF ``tokenizers`` batches run on its own pool, which
  ``tools/preprocess_data.py`` sizes to ``workers``). No process pool, so nothing is pickled and
  the tokenizer is loaded once.
* **Streaming.** At most ``2 * workers + 2`` chunks are in flight and the writer streams to disk,
  so memory is bounded by the chunk size, not the corpus.
* **Deterministic.** Chunks are written in input order whatever the thread timing, so the output
  is the same for every ``workers``.
* ``partitions > 1`` reproduces Megatron-LM's order (line ``i`` goes to partition ``i % P``,
  partitions concatenated) in one pass, into ``P`` temporary datasets merged at the end; with
  ``keep_sequential_samples`` its partitions are contiguous, so the order is the input's.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, TextIO

import numpy as np

from megatron_latentcot.data.indexed_writer import (
    IndexedDatasetError,
    IndexedWriter,
    optimal_dtype,
)
from megatron_latentcot.data.tokenizer import Tokenizer

__all__ = ["PreprocessError", "PreprocessOptions", "Progress", "output_prefix",
           "pin_malloc_mmap_threshold", "preprocess"]

CHUNK_BYTES = 256 << 10  # ~3 MB of transient Python token lists per chunk being encoded
CHUNK_LINES = 8192
MAX_REPORTED_BAD_LINES = 20
PROGRESS_MIN_BYTES = 1 << 30  # below this (and without a TTY) no progress lines: CI logs stay clean
PROGRESS_EVERY_S = {True: 0.5, False: 60.0}  # TTY: a live line; otherwise a line a minute


class PreprocessError(Exception):
    """A problem with the inputs, tokenizer or output; the message says which and where."""


@dataclass(frozen=True)
class PreprocessOptions:
    """What ``preprocess`` does (the tool's flags, Megatron-LM's names)."""

    inputs: list[str]
    output_prefix: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    keep_sequential_samples: bool = False
    skip_bad_lines: bool = False
    log_interval: int | None = None  # documents between progress lines (None: automatic)


def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's dataset name for one JSON key."""
    return f"{prefix}_{key}_document"


# --------------------------------------------------------------------------- input


@dataclass
class Chunk:
    """Consecutive raw lines of one input file."""

    path: str
    first_line: int  # 1-based line number in ``path`` of ``lines[0]``
    first_index: int  # 0-based index of ``lines[0]`` over all inputs (for partitions)
    lines: list[bytes]


def open_input(path: str) -> tuple[IO[bytes], IO[bytes]]:
    """(line reader, raw file) for plain, gzip (``.gz``) or zstandard (``.zst``) JSONL.

    The raw file's position is the number of (compressed) bytes read: the progress measure.
    """
    try:
        raw = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise PreprocessError(f"{path}: input file not found") from None
    except IsADirectoryError:
        raise PreprocessError(f"{path}: is a directory, expected a JSONL file") from None
    except OSError as e:
        raise PreprocessError(f"{path}: cannot open input ({e.strerror or e})") from None
    if path.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw), 1 << 20), raw  # type: ignore[arg-type]
    if path.endswith(".zst"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, 1 << 20), raw  # type: ignore[arg-type]
    return raw, raw


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
    if "zstandard" in sys.modules:
        errors += (sys.modules["zstandard"].ZstdError,)
    return errors


def read_chunks(paths: list[str], stats: Stats) -> Iterator[Chunk]:
    """Lines of every input in order, in chunks of about CHUNK_BYTES (or CHUNK_LINES lines)."""
    index = 0
    for path in paths:
        reader, raw = open_input(path)
        done_before = stats.raw_bytes_read
        lineno = 0
        with reader, raw:
            lines: list[bytes] = []
            size = 0
            try:
                for lineno, line in enumerate(reader, start=1):  # noqa: B007 (used after)
                    lines.append(line)
                    size += len(line)
                    if size >= CHUNK_BYTES or len(lines) >= CHUNK_LINES:
                        stats.raw_bytes_read = done_before + raw.tell()
                        yield Chunk(path, lineno - len(lines) + 1, index, lines)
                        index += len(lines)
                        lines, size = [], 0
            except _decompress_errors() as e:  # gzip.BadGzipFile, zstd errors, truncation
                raise PreprocessError(f"{path}:{lineno + 1}: cannot decompress/read input "
                                      f"({e})") from None
            stats.raw_bytes_read = done_before + os.path.getsize(path)
            if lines:
                yield Chunk(path, lineno - len(lines) + 1, index, lines)
                index += len(lines)
        stats.lines += lineno


def pin_malloc_mmap_threshold() -> None:
    """Keep glibc from turning freed token lists into a heap that never shrinks.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), so the
    next chunk's big lists come from the heap and fragment it: RSS crept from 55 to 100 MB over
    a 168 MB corpus. Pinning the threshold (as ``MALLOC_MMAP_THRESHOLD_=131072`` would) keeps
    memory flat, for about 1% more CPU (page faults). A no-op off glibc. Call it once, at start.
    """
    try:
        ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    """One chunk, tokenized: per key the flat tokens and per-document lengths."""

    path: str
    tokens: dict[str, tuple[np.ndarray, np.ndarray]]
    indices: np.ndarray  # input-wide line index of each document (for partitions)
    bad: list[tuple[int, str]]  # (line number, problem)
    good_bytes: int


def _describe(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse(line: bytes, keys: list[str]) -> list[str] | str:
    """The texts of ``keys`` in one JSON line, or what is wrong with the line."""
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 ({e.reason} at byte {e.start})"
    except ValueError as e:
        msg = "empty line" if not line.strip() else f"invalid JSON ({e})"
        return f"{msg}; expected one JSON object per line"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_describe(obj)}"
    texts = []
    for key in keys:
        if key not in obj:
            return f"missing key {key!r} (keys present: {sorted(obj)[:8]})"
        if not isinstance(obj[key], str):
            return f"key {key!r} is {_describe(obj[key])}, expected a string"
        texts.append(obj[key])
    return texts


@dataclass(frozen=True)
class _Job:
    tokenizer: Tokenizer
    keys: list[str]
    append_eod: bool
    dtype: np.dtype
    limit: int  # ids must be below this: the vocabulary and the dtype


def encode_chunk(chunk: Chunk, job: _Job) -> Encoded:
    """Parse and tokenize one chunk (runs in a worker thread)."""
    texts: list[list[str]] = [[] for _ in job.keys]
    bad: list[tuple[int, str]] = []
    good: list[int] = []
    good_bytes = 0
    for i, line in enumerate(chunk.lines):
        parsed = _parse(line, job.keys)
        if isinstance(parsed, str):
            bad.append((chunk.first_line + i, parsed))
            continue
        for column, text in zip(texts, parsed):
            column.append(text)
        good.append(i)
        good_bytes += len(line)
    tokens = {}
    for key, column in zip(job.keys, texts):
        ids = job.tokenizer.encode_batch(column, num_threads=1)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= job.limit):
            pos = int(np.argmax((flat < 0) | (flat >= job.limit)))
            doc = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
            raise PreprocessError(
                f"{chunk.path}:{chunk.first_line + good[doc]}: token id {int(flat[pos])} of key "
                f"{key!r} is outside [0, {job.limit}) (vocabulary size / {job.dtype.name} "
                "range): the tokenizer reports a vocab_size smaller than the ids it emits")
        if job.append_eod:  # Megatron-LM appends EOD to non-empty documents only
            flat = np.insert(flat, np.cumsum(lengths)[lengths > 0], job.tokenizer.eod)
            lengths = lengths + (lengths > 0)
        tokens[key] = (flat.astype(job.dtype), lengths)
    return Encoded(chunk.path, tokens, chunk.first_index + np.array(good, dtype=np.int64), bad,
                   good_bytes)


def encode_stream(chunks: Iterator[Chunk], job: _Job, workers: int) -> Iterator[Encoded]:
    """``encode_chunk`` of every chunk, in input order, ``workers`` at a time."""
    pending: deque[Future[Encoded]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="encode") as pool:
        try:
            for chunk in chunks:
                pending.append(pool.submit(encode_chunk, chunk, job))
                if len(pending) >= 2 * workers + 2:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or an interrupt: drop the queued chunks, finish the running ones
            for f in pending:
                f.cancel()


# --------------------------------------------------------------------------- progress


@dataclass
class Stats:
    start: float = field(default_factory=time.perf_counter)
    lines: int = 0
    raw_bytes_read: int = 0
    docs: int = 0
    empty_docs: int = 0
    tokens: int = 0
    good_bytes: int = 0
    bad_lines: int = 0

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def rates(self) -> str:
        dt = self.elapsed()
        return (f"{self.docs / dt:,.1f} docs/s, {self.good_bytes / dt / 2**20:,.2f} MB/s, "
                f"{self.tokens / dt:,.0f} tokens/s")


class Progress:
    """Progress lines on stderr: bytes read, rates and ETA.

    Automatic (``log_interval`` None): a live line when stderr is a terminal, else a line a
    minute only for inputs of ``PROGRESS_MIN_BYTES`` or more, so CI logs stay clean. With
    ``log_interval`` (Megatron-LM's flag): a line every that many documents.
    """

    def __init__(self, total_bytes: int, log_interval: int | None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total_bytes
        self.log_interval = log_interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.timed = log_interval is None and (self.tty or total_bytes >= PROGRESS_MIN_BYTES)
        self.every = PROGRESS_EVERY_S[self.tty]
        self.next_time = time.perf_counter() + self.every
        self.next_docs = log_interval or 0
        self.shown = False

    def line(self, stats: Stats) -> str:
        done = min(stats.raw_bytes_read, self.total)
        dt = stats.elapsed()
        eta = ""
        if 0 < done < self.total:
            left = int(dt * (self.total - done) / done)
            eta = f", ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        pct = f"[{100 * done / self.total:5.1f}%] " if self.total else ""
        return (f"{pct}{done / 2**20:,.1f}/{self.total / 2**20:,.1f} MB read, "
                f"{stats.docs:,} docs, {stats.tokens:,} tokens ({stats.rates()}){eta}")

    def update(self, stats: Stats) -> None:
        if self.log_interval is not None and stats.docs >= self.next_docs:
            print(self.line(stats), file=self.stream, flush=True)
            self.next_docs = (stats.docs // self.log_interval + 1) * self.log_interval
        elif self.timed and time.perf_counter() >= self.next_time:
            end = "\r" if self.tty else "\n"
            print(self.line(stats) + ("\x1b[K" if self.tty else ""), end=end,
                  file=self.stream, flush=True)
            self.next_time = time.perf_counter() + self.every
            self.shown = True

    def close(self) -> None:
        if self.shown and self.tty:
            print(file=self.stream, flush=True)


# --------------------------------------------------------------------------- output


class _Output:
    """The writers of one JSON key: one, or one per partition merged into it at the end."""

    def __init__(self, prefix: str, vocab_size: int, dtype: np.dtype, partitions: int,
                 scratch: str | None) -> None:
        self.final = IndexedWriter(prefix, vocab_size, dtype.type)
        self.parts = [IndexedWriter(os.path.join(scratch, f"part{i}"), vocab_size, dtype.type)
                      for i in range(partitions)] if scratch else []

    def add(self, flat: np.ndarray, lengths: np.ndarray, indices: np.ndarray) -> None:
        if not self.parts:
            self.final.add_documents(flat, lengths, checked=True)
            return
        part = indices % len(self.parts)
        owner = np.repeat(part, lengths)
        for p, writer in enumerate(self.parts):
            docs = part == p
            if docs.any():
                writer.add_documents(flat[owner == p], lengths[docs], checked=True)

    def finalize(self, meta: dict[str, Any]) -> str:
        for writer in self.parts:
            self.final.add_index(writer.finalize())
        return self.final.finalize(meta).prefix

    def abort(self) -> None:
        for writer in [self.final, *self.parts]:
            if not writer.done:
                writer.abort()


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


def preprocess(opts: PreprocessOptions, tokenizer: Tokenizer) -> dict[str, Any]:
    """Tokenize ``opts.inputs`` into one dataset per JSON key; return the run's summary."""
    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size))
    job = _Job(tokenizer, list(opts.json_keys), opts.append_eod, dtype,
               min(tokenizer.vocab_size, int(np.iinfo(dtype).max) + 1))
    partitions = 1 if opts.keep_sequential_samples else opts.partitions
    stats = Stats()
    progress = Progress(sum(os.path.getsize(p) for p in opts.inputs), opts.log_interval)
    scratch = None
    outputs: dict[str, _Output] = {}
    try:
        if partitions > 1:  # beside the output: the merge then copies within one file system
            parent = os.path.dirname(os.path.abspath(opts.output_prefix))
            try:
                os.makedirs(parent, exist_ok=True)
                scratch = tempfile.mkdtemp(prefix=".partitions-", dir=parent)
            except OSError as e:
                raise PreprocessError(f"{parent}: cannot write partitions ({e.strerror or e})") from None
        for i, key in enumerate(opts.json_keys):
            outputs[key] = _Output(output_prefix(opts.output_prefix, key), tokenizer.vocab_size,
                                   dtype, partitions, scratch and os.path.join(scratch, str(i)))
        stream = encode_stream(read_chunks(opts.inputs, stats), job, opts.workers)
        with contextlib.closing(stream):  # stop the threads at once on an error
            for enc in stream:
                for lineno, msg in enc.bad:
                    _report_bad(stats, enc.path, lineno, msg, opts.skip_bad_lines)
                for key, (flat, lengths) in enc.tokens.items():
                    outputs[key].add(flat, lengths, enc.indices)
                    stats.tokens += int(flat.size)
                first = enc.tokens[opts.json_keys[0]][1]
                stats.docs += int(first.size)
                stats.empty_docs += int((first == 0).sum())
                stats.good_bytes += enc.good_bytes
                progress.update(stats)
        if stats.lines == 0:
            raise PreprocessError(f"{', '.join(opts.inputs)}: input is empty (no JSON lines)")
        if stats.docs == 0:
            raise PreprocessError(f"{', '.join(opts.inputs)}: no documents left after skipping "
                                  f"{stats.bad_lines} bad line(s)")
        meta = {
            "tokenizer_type": tokenizer.tokenizer_type,
            "tokenizer_model": os.path.abspath(tokenizer.path),
            **({"merge_file": os.path.abspath(tokenizer.merge_path)}
               if getattr(tokenizer, "merge_path", None) else {}),
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "append_eod": opts.append_eod,
            "inputs": [os.path.abspath(p) for p in opts.inputs],
            "partitions": partitions,
            "skipped_lines": stats.bad_lines,
            "created_by": "megatron_latentcot tools/preprocess_data.py",
        }
        written = {key: out.finalize({**meta, "json_key": key}) for key, out in outputs.items()}
    except IndexedDatasetError as e:
        raise PreprocessError(str(e)) from None
    finally:
        progress.close()
        for out in outputs.values():
            out.abort()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = stats.elapsed()
    return {
        "documents": stats.docs, "empty_documents": stats.empty_docs, "tokens": stats.tokens,
        "bytes": stats.good_bytes, "lines": stats.lines, "skipped_lines": stats.bad_lines,
        "seconds": elapsed, "docs_per_s": stats.docs / elapsed,
        "mb_per_s": stats.good_bytes / 2**20 / elapsed, "tokens_per_s": stats.tokens / elapsed,
        "rates": stats.rates(), "dtype": dtype.name, "workers": opts.workers,
        "partitions": partitions, "outputs": written,
    }
