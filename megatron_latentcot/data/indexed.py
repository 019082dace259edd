"""Megatron-format indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``) on megatron-core.

Reading and writing are megatron-core's ``IndexedDatasetBuilder``/``IndexedDataset``, so the files
stay byte-compatible with Megatron-LM. What this module adds is what those classes leave out:

* **validation**: megatron-core reads a corrupt ``.idx`` with bare ``assert``s or happily mmaps a
  truncated one; ``validate_indexed`` checks magic, version, dtype code, sizes, pointers and the
  ``.bin`` length, and raises one ``IndexedDatasetError`` that names the file;
* **atomic writes**: ``IndexedWriter`` writes to temporary names and renames ``.bin`` then ``.idx``
  (the ``.idx`` is the commit marker), so an interrupted run never leaves an ``.idx`` that looks
  complete;
* **token range checks**: megatron-core casts with ``numpy.array(..., dtype)``, which silently
  wraps an id >= 65536 into a uint16 file;
* **provenance**: ``<prefix>.meta.json`` records the tokenizer fingerprint, so a dataset built
  with one tokenizer is never silently read with another (``check_tokenizer``).

``.idx`` layout (little endian): ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1, dtype code ``<B``,
sequence count ``<Q``, document count ``<Q``, sequence lengths ``int32[S]``, sequence byte
pointers ``int64[S]``, document indices ``int64[D]`` (sequence index where each document starts,
first 0, last S), then ``int8[S]`` modes for multimodal datasets only.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# megatron-core's DType codes (indexed_dataset.DType); repeated here so validation needs no import.
_DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_META_FORMAT = "megatron-latentcot-indexed/1"


class IndexedDatasetError(ValueError):
    """An indexed dataset is missing, corrupt, or was built with a different tokenizer."""


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """Token dtype Megatron-LM picks for a vocabulary: uint16 below 65500 ids, else int32.

    Megatron-core's ``DType.optimal_dtype`` rule, restated so that choosing a dtype does not
    import megatron-core (and torch): preprocessing workers fork before that import. A test pins
    the two to each other.
    """
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def meta_path(prefix: str | os.PathLike[str]) -> str:
    """Where the provenance record of ``prefix`` lives (``<prefix>.meta.json``)."""
    return f"{os.fspath(prefix)}.meta.json"


@dataclass(frozen=True)
class IndexInfo:
    """Header-level facts of a validated dataset."""

    prefix: str
    dtype: str
    sequences: int
    documents: int  # real documents (Megatron's document count minus the leading 0)
    tokens: int
    multimodal: bool


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


def _check_ids(arr: np.ndarray, limit: int, where: str) -> None:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= limit):
        raise IndexedDatasetError(
            f"{where}: token id {int(arr.max()) if arr.max() >= limit else int(arr.min())} "
            f"outside [0, {limit})"
        )


class IndexedWriter:
    """Write one Megatron dataset atomically through megatron-core's ``IndexedDatasetBuilder``.

    Use as a context manager: ``finalize`` commits, leaving the block without it (an exception, a
    Ctrl-C) removes the temporary files. Token ids are checked against ``vocab_size`` and the
    dtype (ids that do not fit would otherwise be silently wrapped).
    """

    def __init__(self, prefix: str | os.PathLike[str], vocab_size: int,
                 dtype: type[np.number] | None = None) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = os.fspath(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = np.dtype(dtype if dtype is not None else optimal_dtype(vocab_size))
        self._limit = min(self.vocab_size, int(np.iinfo(self.dtype).max) + 1)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = self.prefix + ".bin" + suffix
        self._tmp_idx = self.prefix + ".idx" + suffix
        self._tmp_meta = meta_path(self.prefix) + suffix
        parent = os.path.dirname(os.path.abspath(self.prefix))
        try:
            os.makedirs(parent, exist_ok=True)
            self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=self.dtype.type)
        except OSError as e:
            raise IndexedDatasetError(
                f"{self.prefix}: cannot write the dataset in {parent} ({e.strerror or e})"
            ) from None
        # The builder keeps its per-document index in Python lists (~70 bytes a document);
        # typed arrays hold the same values in 12 and write the same bytes.
        self._builder.sequence_lengths = array("i")
        self._builder.document_indices = array("q", [0])
        self.documents = 0
        self.tokens = 0
        self._done = False

    def add_document(self, ids: Sequence[int] | np.ndarray, *, checked: bool = False) -> None:
        """Append one document (possibly empty: Megatron records it with no sequence).

        ``checked=True`` skips the range check for arrays a worker already checked.
        """
        arr = np.asarray(ids)
        if not checked:
            _check_ids(arr, self._limit, f"{self.prefix}: document {self.documents}")
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        n = int(arr.size)
        # Megatron-LM's preprocess_data.py passes no sequence at all for an empty document.
        self._builder.add_document(arr, [n] if n else [])
        self.documents += 1
        self.tokens += n

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray, *,
                      checked: bool = False) -> None:
        """Append many documents given as one flat token array and per-document lengths.

        Same bytes as ``add_document`` per document, in one write: the preprocessing hot path.
        Uses the builder's public ``data_file``/``sequence_lengths``/``document_indices``.
        """
        flat = np.asarray(flat)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat.size} tokens given")
        if not checked:
            _check_ids(flat, self._limit, f"{self.prefix}: documents from {self.documents}")
        if flat.dtype != self.dtype:
            flat = flat.astype(self.dtype)
        b = self._builder
        b.data_file.write(flat.tobytes(order="C"))
        nonempty = lengths > 0
        seq_before = len(b.sequence_lengths)
        b.sequence_lengths.frombytes(lengths[nonempty].astype(np.int32).tobytes())
        b.document_indices.frombytes((seq_before + np.cumsum(nonempty)).astype(np.int64).tobytes())
        self.documents += int(lengths.size)
        self.tokens += int(flat.size)

    def add_index(self, prefix: str | os.PathLike[str]) -> IndexInfo:
        """Append a whole existing dataset (validated; its dtype must match)."""
        info = validate_indexed(prefix)
        if np.dtype(info.dtype) != self.dtype:
            raise IndexedDatasetError(
                f"{os.fspath(prefix)}.idx: token dtype {info.dtype} differs from the output's "
                f"{self.dtype.name}; datasets to merge must share a tokenizer"
            )
        if info.multimodal:
            raise IndexedDatasetError(f"{os.fspath(prefix)}.idx: multimodal datasets are not "
                                      "supported")
        self._builder.add_index(os.fspath(prefix))
        self.documents += info.documents
        self.tokens += info.tokens
        return info

    def finalize(self, meta: dict[str, Any] | None = None) -> IndexInfo:
        """Write the index and publish ``.bin``, ``.meta.json`` and last ``.idx``."""
        try:
            self._builder.finalize(self._tmp_idx)
            if meta is not None:
                record = {"format": _META_FORMAT, "dtype": self.dtype.name,
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
        except OSError as e:
            self.abort()
            raise IndexedDatasetError(
                f"{self.prefix}: cannot finish writing the dataset ({e.strerror or e})"
            ) from None
        self._done = True
        return validate_indexed(self.prefix)

    @property
    def done(self) -> bool:
        """True once committed or aborted."""
        return self._done

    def abort(self) -> None:
        """Remove the temporary files; the published dataset (if any) is untouched."""
        try:
            self._builder.data_file.close()
        except Exception:  # already closed
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

