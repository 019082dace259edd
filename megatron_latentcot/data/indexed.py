"""Megatron-format indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``): validation and reading.

Reading is megatron-core's ``IndexedDataset``; writing is ``indexed_writer.IndexedWriter`` (numpy
only, byte-identical to megatron-core's ``IndexedDatasetBuilder``), re-exported here. Neither
imports torch or megatron-core at import time. What this module adds is what megatron-core leaves
out:

* **validation**: megatron-core reads a corrupt ``.idx`` with bare ``assert``s or happily mmaps a
  truncated one; ``validate_indexed`` checks magic, version, dtype code, sizes, pointers and the
  ``.bin`` length, and raises one ``IndexedDatasetError`` that names the file;
* **atomic writes** and **token range checks** (``IndexedWriter``, see ``indexed_writer.py``);
* **provenance**: ``<prefix>.meta.json`` records the tokenizer fingerprint, so a dataset built
  with one tokenizer is never silently read with another (``check_tokenizer``).

The ``.idx`` layout is described in ``indexed_writer.py``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from typing import Any

import numpy as np

from megatron_latentcot.data.indexed_writer import DTYPE_CODES as _DTYPE_CODES
from megatron_latentcot.data.indexed_writer import (
    HEADER_SIZE,
    INDEX_MAGIC,
    IndexedDatasetError,
    IndexedWriter,
    IndexInfo,
    meta_path,
    optimal_dtype,
)

__all__ = [
    "HEADER_SIZE",
    "INDEX_MAGIC",
    "IndexInfo",
    "IndexedDatasetError",
    "IndexedReader",
    "IndexedWriter",
    "check_tokenizer",
    "meta_path",
    "open_indexed",
    "optimal_dtype",
    "read_meta",
    "validate_indexed",
]

logger = logging.getLogger(__name__)


def _fail(path: str, what: str) -> IndexedDatasetError:
    return IndexedDatasetError(f"{path}: {what}")


def validate_indexed(
    prefix: str | os.PathLike[str], *, vocab_size: int | None = None, check_tokens: bool = False
) -> IndexInfo:
    """Check that ``<prefix>.idx`` and ``<prefix>.bin`` form a consistent Megatron dataset.

    Catches what megatron-core would turn into an assert, a wrong read or a crash deep inside
    training: missing files, bad magic, wrong version, unknown dtype code, a truncated or padded
    index, pointers that disagree with the lengths, and a ``.bin`` whose size disagrees with the
    index. With ``check_tokens`` the ``.bin`` is also scanned for ids outside ``[0, vocab_size)``.
    """
    prefix = os.fspath(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path, kind in ((idx_path, "index"), (bin_path, "data")):
        if not os.path.isfile(path):
            raise _fail(path, f"{kind} file not found (expected the Megatron dataset '{prefix}' "
                        "written by tools/preprocess_data.py)")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if len(header) < len(INDEX_MAGIC) or header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise _fail(idx_path, f"bad magic {header[:9]!r}: not a Megatron index file "
                    f"(expected it to start with {INDEX_MAGIC!r})")
    if len(header) < HEADER_SIZE:
        raise _fail(idx_path, f"truncated header: {len(header)} bytes, expected {HEADER_SIZE}")
    (version,) = struct.unpack_from("<Q", header, 9)
    if version != 1:
        raise _fail(idx_path, f"unsupported index version {version} (expected 1)")
    (code,) = struct.unpack_from("<B", header, 17)
    if code not in _DTYPE_CODES:
        known = ", ".join(f"{c}={np.dtype(t).name}" for c, t in sorted(_DTYPE_CODES.items()))
        raise _fail(idx_path, f"unknown dtype code {code} (expected one of {known})")
    dtype = np.dtype(_DTYPE_CODES[code])
    seq_count, doc_count = struct.unpack_from("<QQ", header, 18)
    if doc_count < 1:
        raise _fail(idx_path, "document count is 0 (expected at least the leading 0 entry)")
    body = seq_count * (4 + 8) + doc_count * 8
    expected = HEADER_SIZE + body
    if idx_size < expected:
        raise _fail(idx_path, f"truncated index: {idx_size} bytes, but its header ({seq_count} "
                    f"sequences, {doc_count - 1} documents) needs {expected}")
    if idx_size not in (expected, expected + seq_count):
        raise _fail(idx_path, f"index is {idx_size} bytes, expected {expected} for {seq_count} "
                    f"sequences and {doc_count - 1} documents ({expected + seq_count} if "
                    "multimodal): extra bytes at the end")
    multimodal = seq_count > 0 and idx_size == expected + seq_count
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    try:
        off = HEADER_SIZE
        lengths = np.frombuffer(mm, dtype=np.int32, count=seq_count, offset=off)
        off += 4 * seq_count
        pointers = np.frombuffer(mm, dtype=np.int64, count=seq_count, offset=off)
        off += 8 * seq_count
        doc_idx = np.frombuffer(mm, dtype=np.int64, count=doc_count, offset=off)
        if seq_count and lengths.min() < 0:
            raise _fail(idx_path, "negative sequence length: the index is corrupt")
        ends = np.cumsum(lengths, dtype=np.int64) * dtype.itemsize
        if seq_count and (pointers[0] != 0 or np.any(pointers[1:] != ends[:-1])):
            raise _fail(idx_path, "sequence pointers disagree with the sequence lengths: "
                        "the index is corrupt")
        if doc_idx[0] != 0 or doc_idx[-1] != seq_count or np.any(np.diff(doc_idx) < 0):
            raise _fail(idx_path, f"document indices must rise from 0 to the sequence count "
                        f"{seq_count}; got first {int(doc_idx[0])}, last {int(doc_idx[-1])}")
        tokens = int(ends[-1] // dtype.itemsize) if seq_count else 0
    finally:
        del mm
    bin_size = os.path.getsize(bin_path)
    if bin_size != tokens * dtype.itemsize:
        raise _fail(bin_path, f"data file is {bin_size} bytes, but {idx_path} describes "
                    f"{tokens} {dtype.name} tokens = {tokens * dtype.itemsize} bytes "
                    f"({'truncated' if bin_size < tokens * dtype.itemsize else 'too long'}; "
                    "were the .bin and .idx written by different runs?)")
    if check_tokens and tokens:
        _check_token_range(bin_path, dtype, tokens, vocab_size)
    return IndexInfo(prefix, dtype.name, int(seq_count), int(doc_count - 1), tokens, multimodal)


def _check_token_range(bin_path: str, dtype: np.dtype, tokens: int, vocab_size: int | None) -> None:
    data = np.memmap(bin_path, mode="r", dtype=dtype, shape=(tokens,))
    try:
        step = 1 << 24
        lo, hi = 0, 0
        for start in range(0, tokens, step):
            chunk = data[start : start + step]
            lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    finally:
        del data
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise _fail(bin_path, f"token ids span [{lo}, {hi}], outside the vocabulary "
                    f"[0, {vocab_size}) (built with another tokenizer?)")


class IndexedReader:
    """Validated read access to a dataset through megatron-core's ``IndexedDataset``.

    Returns copies: megatron-core hands out views of its mmaps and unmaps them in ``__del__``,
    so an array read from an ``IndexedDataset`` that has since been collected is a segfault.
    ``megatron`` is the underlying ``IndexedDataset`` (its views live only as long as it).
    """

    def __init__(self, prefix: str | os.PathLike[str], *, validate: bool = True) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = os.fspath(prefix)
        self.info = validate_indexed(self.prefix) if validate else None
        self.megatron = IndexedDataset(self.prefix, multimodal=False, mmap=True)
        self.dtype = np.dtype(self.megatron.index.dtype)

    def __len__(self) -> int:
        """Number of sequences (= non-empty documents for preprocess_data.py output)."""
        return len(self.megatron)

    def __getitem__(self, idx: int) -> np.ndarray:
        return np.array(self.megatron[idx])

    @property
    def sequence_lengths(self) -> np.ndarray:
        return np.array(self.megatron.sequence_lengths)

    @property
    def document_indices(self) -> np.ndarray:
        """Sequence index where each document starts; ``len - 1`` documents."""
        return np.array(self.megatron.document_indices)

    def documents(self) -> list[np.ndarray]:
        """Every document's tokens in order, empty documents included."""
        bounds = self.megatron.document_indices
        out = []
        for d in range(len(bounds) - 1):
            parts = [self.megatron[i] for i in range(int(bounds[d]), int(bounds[d + 1]))]
            out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype))
        return out


def open_indexed(prefix: str | os.PathLike[str], *, validate: bool = True) -> IndexedReader:
    """Open ``prefix`` for reading, validating it first (see ``IndexedReader``)."""
    return IndexedReader(prefix, validate=validate)


def read_meta(prefix: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance record beside ``prefix``, or None when there is none (e.g. Megatron-LM's)."""
    path = meta_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise _fail(path, f"unreadable dataset metadata ({e}); delete it or rebuild the "
                    "dataset") from None
    if not isinstance(meta, dict):
        raise _fail(path, "dataset metadata is not a JSON object")
    return meta


def check_tokenizer(prefix: str | os.PathLike[str], tokenizer: Any, *,
                    require_meta: bool = False) -> bool:
    """Raise if ``prefix`` was built with a different tokenizer than ``tokenizer``.

    Returns True when the metadata confirmed the match and False when there is no metadata to
    compare (datasets written by Megatron-LM itself), unless ``require_meta``.
    """
    meta = read_meta(prefix)
    path = meta_path(prefix)
    if meta is None:
        if require_meta:
            raise _fail(path, "no dataset metadata: cannot tell which tokenizer built this "
                        "dataset (rebuild it with tools/preprocess_data.py)")
        return False
    built = meta.get("tokenizer_fingerprint")
    if built != tokenizer.fingerprint:
        raise _fail(path, f"dataset was built with tokenizer {meta.get('tokenizer_model')!r} "
                    f"(sha256 {str(built)[:12]}..., vocab {meta.get('vocab_size')}), not with "
                    f"{tokenizer.path!r} (sha256 {tokenizer.fingerprint[:12]}..., vocab "
                    f"{tokenizer.vocab_size}); re-run tools/preprocess_data.py with this "
                    "tokenizer or point the config at the right one")
    return True
