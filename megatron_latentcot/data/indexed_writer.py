"""Write Megatron-format indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``) with numpy alone.

Preprocessing should cost what the tokenizer costs: importing torch and megatron-core to write a
header and three arrays took 4 s and 364 MB per run. This module writes the same bytes as
megatron-core's ``IndexedDatasetBuilder`` (a test compares them) and imports neither, so
``tools/preprocess_data.py`` and ``tools/merge_datasets.py`` stay light; ``indexed.py`` (the
validating reader) re-exports everything here.

``.idx`` layout (little endian): ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1, dtype code ``<B``,
sequence count ``<Q``, document count ``<Q`` (documents + 1), sequence lengths ``int32[S]``,
sequence byte pointers ``int64[S]``, document indices ``int64[D + 1]`` (sequence index where each
document starts: first 0, last S), then ``int8[S]`` modes for multimodal datasets only.

Memory stays flat in the corpus size: tokens go straight to the ``.bin`` and the per-sequence
index to two unnamed temporary files (gone even after a kill), which ``finalize`` streams into the
``.idx`` block by block.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

__all__ = [
    "DTYPE_CODES",
    "HEADER_SIZE",
    "INDEX_MAGIC",
    "IndexInfo",
    "IndexedDatasetError",
    "IndexedWriter",
    "meta_path",
    "optimal_dtype",
]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# megatron-core's DType codes (indexed_dataset.DType).
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
META_FORMAT = "megatron-latentcot-indexed/1"
_BLOCK = 1 << 20  # index entries per block when assembling the .idx


class IndexedDatasetError(ValueError):
    """An indexed dataset is missing, corrupt, or was built with a different tokenizer."""


@dataclass(frozen=True)
class IndexInfo:
    """Header-level facts of a dataset."""

    prefix: str
    dtype: str
    sequences: int
    documents: int  # real documents (Megatron's document count minus the leading 0)
    tokens: int
    multimodal: bool


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """Token dtype Megatron-LM picks for a vocabulary: uint16 below 65500 ids, else int32.

    megatron-core's ``DType.optimal_dtype`` rule, restated so that choosing a dtype does not
    import megatron-core (and torch). A test pins the two to each other.
    """
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def meta_path(prefix: str | os.PathLike[str]) -> str:
    """Where the provenance record of ``prefix`` lives (``<prefix>.meta.json``)."""
    return f"{os.fspath(prefix)}.meta.json"


def _check_ids(arr: np.ndarray, limit: int, where: str) -> None:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= limit):
        bad = int(arr.max()) if int(arr.max()) >= limit else int(arr.min())
        raise IndexedDatasetError(f"{where}: token id {bad} outside [0, {limit})")


class IndexedWriter:
    """Write one Megatron dataset atomically, streaming.

    Use as a context manager: ``finalize`` commits (``.bin``, then ``.meta.json``, then the
    ``.idx`` as the commit marker); leaving the block without it (an exception, a Ctrl-C) removes
    the temporary files. Token ids are checked against ``vocab_size`` and the dtype: a plain cast
    would silently wrap an id >= 65536 into a uint16 file.
    """

    def __init__(self, prefix: str | os.PathLike[str], vocab_size: int,
                 dtype: type[np.number] | None = None) -> None:
        self.prefix = os.fspath(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = np.dtype(dtype if dtype is not None else optimal_dtype(vocab_size))
        if self.dtype.type not in DTYPE_CODES.values():
            raise ValueError(f"token dtype {self.dtype.name} has no Megatron dtype code")
        self._limit = min(self.vocab_size, int(np.iinfo(self.dtype).max) + 1)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = self.prefix + ".bin" + suffix
        self._tmp_idx = self.prefix + ".idx" + suffix
        self._tmp_meta = meta_path(self.prefix) + suffix
        parent = os.path.dirname(os.path.abspath(self.prefix))
        self._files: list[IO[bytes]] = []
        self._done = False
        with self._os_errors(f"cannot write the dataset in {parent}"):
            os.makedirs(parent, exist_ok=True)
            self._bin = open(self._tmp_bin, "wb", buffering=1 << 20)
            self._files.append(self._bin)
            self._lengths = tempfile.TemporaryFile(dir=parent)  # int32 per sequence
            self._doc_ends = tempfile.TemporaryFile(dir=parent)  # int64 per document
            self._files += [self._lengths, self._doc_ends]
        self.documents = 0
        self.sequences = 0
        self.tokens = 0

    @contextlib.contextmanager
    def _os_errors(self, what: str) -> Iterator[None]:
        """An OSError (a full disk, a missing directory) aborts the write: one clear error."""
        try:
            yield
        except OSError as e:
            self.abort()
            raise IndexedDatasetError(f"{self.prefix}: {what} ({e.strerror or e})") from None

    def add_document(self, ids: Sequence[int] | np.ndarray, *, checked: bool = False) -> None:
        """Append one document (possibly empty: Megatron records it with no sequence)."""
        arr = np.asarray(ids)
        if arr.size == 0:
            arr = arr.astype(self.dtype)
        self.add_documents(arr, np.array([arr.size], dtype=np.int64), checked=checked)

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray, *,
                      checked: bool = False) -> None:
        """Append many documents given as one flat token array and per-document lengths.

        ``checked=True`` skips the range check for ids the caller already checked.
        """
        flat = np.asarray(flat)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat.size} tokens given")
        if not checked:
            _check_ids(flat, self._limit, f"{self.prefix}: document {self.documents}")
        nonempty = lengths > 0
        ends = self.sequences + np.cumsum(nonempty, dtype=np.int64)
        with self._os_errors("cannot write the dataset"):
            self._bin.write(flat.astype(self.dtype, copy=False).tobytes())
            self._lengths.write(lengths[nonempty].astype(np.int32).tobytes())
            self._doc_ends.write(ends.tobytes())
        self.documents += int(lengths.size)
        self.sequences += int(nonempty.sum())
        self.tokens += int(flat.size)

    def add_index(self, info: IndexInfo) -> None:
        """Append a whole dataset, ``info`` as its validation returned it (same dtype)."""
        if np.dtype(info.dtype) != self.dtype:
            raise IndexedDatasetError(
                f"{info.prefix}.idx: token dtype {info.dtype} differs from the output's "
                f"{self.dtype.name}; datasets to merge must share a tokenizer")
        if info.multimodal:
            raise IndexedDatasetError(f"{info.prefix}.idx: multimodal datasets are not supported")
        s = info.sequences
        idx = np.memmap(info.prefix + ".idx", mode="r", dtype=np.uint8)
        try:
            with self._os_errors(f"cannot merge {info.prefix}"):
                lengths = np.frombuffer(idx, np.int32, s, HEADER_SIZE)
                doc_idx = np.frombuffer(idx, np.int64, info.documents + 1, HEADER_SIZE + 12 * s)
                for start in range(0, s, _BLOCK):
                    self._lengths.write(lengths[start:start + _BLOCK].tobytes())
                for start in range(1, doc_idx.size, _BLOCK):  # without the leading 0
                    self._doc_ends.write((doc_idx[start:start + _BLOCK] + self.sequences).tobytes())
                with open(info.prefix + ".bin", "rb") as f:
                    shutil.copyfileobj(f, self._bin, 1 << 20)
        finally:
            del idx
        self.documents += info.documents
        self.sequences += s
        self.tokens += info.tokens

    def _write_index(self) -> None:
        itemsize = self.dtype.itemsize
        code = next(c for c, t in DTYPE_CODES.items() if t == self.dtype.type)
        with open(self._tmp_idx, "wb", buffering=1 << 20) as out:
            out.write(INDEX_MAGIC + struct.pack("<QBQQ", 1, code, self.sequences,
                                                self.documents + 1))
            self._lengths.seek(0)
            shutil.copyfileobj(self._lengths, out, 1 << 20)
            self._lengths.seek(0)
            offset = 0  # byte pointer of the next sequence: exclusive cumsum of lengths
            while block := self._lengths.read(4 * _BLOCK):
                nbytes = np.frombuffer(block, np.int32).astype(np.int64) * itemsize
                ends = offset + np.cumsum(nbytes)
                out.write(np.concatenate(([offset], ends[:-1])).astype(np.int64).tobytes())
                offset = int(ends[-1])
            out.write(struct.pack("<q", 0))
            self._doc_ends.seek(0)
            shutil.copyfileobj(self._doc_ends, out, 1 << 20)

    def finalize(self, meta: dict[str, Any] | None = None) -> IndexInfo:
        """Write the index and publish ``.bin``, ``.meta.json`` and last ``.idx``."""
        with self._os_errors("cannot finish writing the dataset"):
            self._bin.close()
            self._write_index()
            for f in self._files:
                f.close()
            if meta is not None:
                record = {"format": META_FORMAT, "dtype": self.dtype.name,
                          "documents": self.documents, "tokens": self.tokens, **meta}
                with open(self._tmp_meta, "w", encoding="utf-8") as f:
                    json.dump(record, f, indent=2, sort_keys=True)
                    f.write("\n")
            # Drop the old commit marker first: a crash between renames then leaves no .idx.
            for old in (self.prefix + ".idx", meta_path(self.prefix)):
                if os.path.exists(old):
                    os.unlink(old)
            os.replace(self._tmp_bin, self.prefix + ".bin")
            if meta is not None:
                os.replace(self._tmp_meta, meta_path(self.prefix))
            os.replace(self._tmp_idx, self.prefix + ".idx")
        self._done = True
        return IndexInfo(self.prefix, self.dtype.name, self.sequences, self.documents,
                         self.tokens, False)

    @property
    def done(self) -> bool:
        """True once committed or aborted."""
        return self._done

    def abort(self) -> None:
        """Remove the temporary files; the published dataset (if any) is untouched."""
        for f in self._files:
            try:
                f.close()
            except OSError:  # a full disk fails the final flush; the file goes anyway
                pass
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_meta):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._done = True

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._done:
            self.abort()

