"""megatron_latentcot.data.indexed and tools/merge_datasets.py: format, validation, atomicity."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_latentcot.cli.merge_datasets import main as merge_main
from megatron_latentcot.cli.preprocess_data import main as preprocess_main
from megatron_latentcot.data.indexed import (
    HEADER_SIZE,
    IndexedDatasetError,
    IndexedReader,
    IndexedWriter,
    check_tokenizer,
    meta_path,
    open_indexed,
    optimal_dtype,
    read_meta,
    validate_indexed,
)

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def docs(corpus_paths, sp_tokenizer) -> list[list[int]]:
    """Token ids of 12 real addresses (one made empty), as preprocess_data would store them."""
    out = []
    with open(corpus_paths.valid, encoding="utf-8") as f:
        for i, line in enumerate(f):
            text = json.loads(line)["text"][:3000]
            out.append([] if i == 4 else sp_tokenizer.encode(text) + [sp_tokenizer.eod])
    return out


def write(prefix: Path, docs: list[list[int]], vocab_size: int, meta=None) -> None:
    with IndexedWriter(prefix, vocab_size) as w:
        for d in docs:
            w.add_document(d)
        w.finalize(meta)


@pytest.fixture
def dataset(tmp_path, docs, sp_tokenizer) -> Path:
    prefix = tmp_path / "ds"
    write(prefix, docs, sp_tokenizer.vocab_size,
          {"tokenizer_fingerprint": sp_tokenizer.fingerprint, "vocab_size": 4096})
    return prefix


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize("vocab", [None, 1, 4096, 50257, 65499, 65500, 65535, 65536, 128256])
def test_dtype_rule_is_megatrons(vocab):
    from megatron.core.datasets.indexed_dataset import DType

    assert optimal_dtype(vocab) is DType.optimal_dtype(vocab)


def test_writer_bytes_equal_megatron_builder(tmp_path, docs):
    """Our writer (per document and batched) writes exactly what IndexedDatasetBuilder does."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for d in docs:
        ref.add_document(np.array(d, dtype=np.int64), [len(d)] if d else [])
    ref.finalize(str(tmp_path / "ref.idx"))
    write(tmp_path / "one", docs, 4096)
    with IndexedWriter(tmp_path / "many", 4096) as w:
        flat = np.concatenate([np.array(d, dtype=np.int64) for d in docs])
        w.add_documents(flat[:0], np.zeros(0, dtype=np.int64))
        w.add_documents(flat, np.array([len(d) for d in docs]))
        w.finalize()
    for name in ("one", "many"):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"{name}{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_reader_round_trip_with_empty_document(dataset, docs):
    reader = open_indexed(dataset)
    assert reader.dtype == np.uint16
    assert len(reader) == len(docs) - 1  # the empty document has no sequence
    assert [d.tolist() for d in reader.documents()] == docs
    info = validate_indexed(dataset)
    assert (info.documents, info.sequences, info.tokens) == (len(docs), len(docs) - 1,
                                                            sum(map(len, docs)))
    first = reader[0]
    del reader  # megatron-core unmaps on collection; ours handed out a copy
    assert first.tolist() == docs[0]


def test_int32_for_large_vocab(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 128256, size=n).tolist() for n in (5, 0, 300, 1)]
    write(tmp_path / "big", docs, 128256)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "big"))
    assert ds.index.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == [d for d in docs if d]


@pytest.mark.parametrize("vocab, ids, bad", [
    (4096, [1, 2, 4096], 4096),     # id == vocab size
    (60000, [1, 70000], 70000),     # would wrap silently in a uint16 file
    (4096, [3, -1], -1),
])
def test_token_id_out_of_range(tmp_path, vocab, ids, bad):
    with pytest.raises(IndexedDatasetError, match=rf"document 0: token id {bad} outside"):
        with IndexedWriter(tmp_path / "x", vocab) as w:
            w.add_document(ids)
    assert list(tmp_path.iterdir()) == []


def test_check_tokens_scans_the_data(dataset):
    validate_indexed(dataset, vocab_size=4096, check_tokens=True)
    with pytest.raises(IndexedDatasetError, match=r"ds\.bin: token ids span .* outside"):
        validate_indexed(dataset, vocab_size=100, check_tokens=True)


# --------------------------------------------------------------------------- atomicity


def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedWriter(tmp_path / "x", 100) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_crash_between_renames_leaves_no_index(tmp_path, dataset, docs, monkeypatch):
    """The .idx is renamed last and the old one removed first: a crash never pairs a complete
    looking .idx with a .bin from another run."""
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(IndexedDatasetError, match="cannot finish writing"):
        write(dataset, docs[:3], 4096)
    assert not Path(f"{dataset}.idx").exists()
    assert not [p for p in dataset.parent.iterdir() if ".tmp-" in p.name]
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: index file not found"):
        validate_indexed(dataset)


def test_rewrite_replaces_dataset(dataset, docs):
    write(dataset, docs[:2], 4096)
    assert validate_indexed(dataset).documents == 2
    assert read_meta(dataset) is None  # the old metadata went with the old dataset


# --------------------------------------------------------------------------- validation


def _corrupt(prefix: Path, ext: str, offset: int | None = None, data: bytes = b"",
             truncate: int | None = None) -> None:
    path = Path(f"{prefix}{ext}")
    raw = bytearray(path.read_bytes())
    if truncate is not None:
        raw = raw[:truncate]
    if offset is not None:
        raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("ext, kwargs, message", [
    (".idx", {"offset": 0, "data": b"NOTANIDX\x00"}, r"ds\.idx: bad magic"),
    (".idx", {"offset": 9, "data": struct.pack("<Q", 2)}, r"ds\.idx: unsupported index version 2"),
    (".idx", {"offset": 17, "data": b"\x09"}, r"ds\.idx: unknown dtype code 9"),
    (".idx", {"truncate": 20}, r"ds\.idx: truncated header"),
    (".idx", {"truncate": HEADER_SIZE + 30}, r"ds\.idx: truncated index"),
    (".idx", {"offset": 10**6, "data": b"\x00" * 5}, r"ds\.idx: index is \d+ bytes, expected"),
    (".idx", {"offset": HEADER_SIZE + 4 * 11 + 8, "data": struct.pack("<q", 12345)},
     r"ds\.idx: sequence pointers disagree"),
    (".idx", {"offset": HEADER_SIZE, "data": struct.pack("<i", -5)},
     r"ds\.idx: negative sequence length"),
    (".bin", {"truncate": 100}, r"ds\.bin: data file is 100 bytes, .* \(truncated"),
    (".bin", {"offset": 10**7, "data": b"\x01\x00"}, r"ds\.bin: data file is .* \(too long"),
])
def test_corrupt_files_give_one_clear_error(dataset, ext, kwargs, message):
    _corrupt(dataset, ext, **kwargs)
    with pytest.raises(IndexedDatasetError, match=message):
        validate_indexed(dataset)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedReader(dataset)


def test_corrupt_document_indices(dataset, docs):
    seqs = len(docs) - 1
    off = HEADER_SIZE + 12 * seqs + 8 * len(docs)  # last document index
    _corrupt(dataset, ".idx", offset=off, data=struct.pack("<q", seqs + 3))
    with pytest.raises(IndexedDatasetError, match="document indices must rise"):
        validate_indexed(dataset)


@pytest.mark.parametrize("missing", [".idx", ".bin"])
def test_missing_file(dataset, missing):
    os.unlink(f"{dataset}{missing}")
    with pytest.raises(IndexedDatasetError, match=rf"ds\{missing}: .* file not found"):
        validate_indexed(dataset)


# --------------------------------------------------------------------------- tokenizer check


def test_tokenizer_fingerprint_check(tmp_path, dataset, sp_tokenizer, hf_tokenizer):
    assert check_tokenizer(dataset, sp_tokenizer) is True
    with pytest.raises(IndexedDatasetError) as e:
        check_tokenizer(dataset, hf_tokenizer)
    assert meta_path(dataset) in str(e.value) and "re-run tools/preprocess_data.py" in str(e.value)
    write(tmp_path / "bare", [[1, 2]], 4096)  # no metadata, like Megatron-LM's own output
    assert check_tokenizer(tmp_path / "bare", hf_tokenizer) is False
    with pytest.raises(IndexedDatasetError, match="no dataset metadata"):
        check_tokenizer(tmp_path / "bare", hf_tokenizer, require_meta=True)
    Path(meta_path(dataset)).write_text("{not json")
    with pytest.raises(IndexedDatasetError, match="unreadable dataset metadata"):
        check_tokenizer(dataset, sp_tokenizer)


# --------------------------------------------------------------------------- merge


def _preprocess(capsys, src: Path, prefix: Path, tokenizer: Path) -> Path:
    rc = preprocess_main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer-type",
                          "sentencepiece", "--tokenizer-model", str(tokenizer), "--append-eod"])
    capsys.readouterr()
    assert rc == 0
    return Path(f"{prefix}_text_document")


def test_merge_equals_preprocessing_the_concatenation(tmp_path, capsys):
    lines = (GOLDEN / "sotu_small.jsonl").read_text().splitlines(keepends=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate((lines[:7], lines[7:15], lines[15:])):  # the empty doc is in shard 1
        (tmp_path / f"part{i}.jsonl").write_text("".join(part))
        _preprocess(capsys, tmp_path / f"part{i}.jsonl", shards / f"part{i}",
                    GOLDEN / "sotu_bpe1k.model")
    assert merge_main(["--input", str(shards), "--output-prefix", str(tmp_path / "merged")]) == 0
    assert "merged 3 datasets" in capsys.readouterr().out
    for ext in (".bin", ".idx"):  # and so equal to Megatron-LM's golden output
        assert (tmp_path / f"merged{ext}").read_bytes() == \
            (GOLDEN / f"sotu_small_text_document{ext}").read_bytes()
    meta = read_meta(tmp_path / "merged")
    assert meta["documents"] == 21 and len(meta["merged_from"]) == 3
    # explicit prefixes merge in the order given
    p = [str(shards / f"part{i}_text_document") for i in (2, 0)]
    assert merge_main(["--input", *p, "--output-prefix", str(tmp_path / "m2")]) == 0
    docs = IndexedReader(tmp_path / "m2").documents()
    expect = IndexedReader(p[0]).documents() + IndexedReader(p[1]).documents()
    assert [d.tolist() for d in docs] == [d.tolist() for d in expect]


def test_merge_refuses_mismatched_inputs(tmp_path, capsys, sp_tokenizer):
    src = GOLDEN / "sotu_small.jsonl"
    a = _preprocess(capsys, src, tmp_path / "a", GOLDEN / "sotu_bpe1k.model")
    b = _preprocess(capsys, src, tmp_path / "b", Path(sp_tokenizer.path))
    assert merge_main(["--input", str(a), str(b), "--output-prefix", str(tmp_path / "m")]) == 1
    assert "built with different tokenizers" in capsys.readouterr().err
    write(tmp_path / "wide", [[1, 2, 3]], 100000)
    assert merge_main(["--input", str(a), str(tmp_path / "wide"), "--output-prefix",
                       str(tmp_path / "m")]) == 1
    assert "different token dtypes" in capsys.readouterr().err
    _corrupt(b, ".bin", truncate=10)
    assert merge_main(["--input", str(a), str(b), "--output-prefix", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert f"{b}.bin: data file is 10 bytes" in err and err.count("error:") == 1
    orphan = tmp_path / "dir"
    orphan.mkdir()
    (orphan / "x.bin").write_bytes(b"")
    assert merge_main(["--input", str(orphan), "--output-prefix", str(tmp_path / "m")]) == 1
    assert "x.bin has no .idx" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*"))


def test_merge_checks_token_ids_of_inputs_without_metadata(tmp_path, capsys, docs, sp_tokenizer):
    """An input without .meta.json (Megatron-LM's) cannot prove its tokenizer: its ids are
    checked against the vocabulary the other inputs record (or --vocab-size). Here the 4096-id
    tokenizer's dataset is refused next to a 1000-id one; both are uint16, so the dtype check
    alone let it through."""
    from megatron_latentcot.data.tokenizer import build_tokenizer

    small = build_tokenizer("sentencepiece", GOLDEN / "sotu_bpe1k.model")
    golden = IndexedReader(GOLDEN / "sotu_small_text_document").documents()
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, [d.tolist() for d in golden], small.vocab_size,
          {"tokenizer_fingerprint": small.fingerprint, "vocab_size": small.vocab_size})
    write(b, docs, sp_tokenizer.vocab_size)  # no metadata
    out = ["--output-prefix", str(tmp_path / "m")]

    def merge(*args: str) -> tuple[int, list[str]]:
        rc = merge_main(["--input", *args, *out])
        return rc, capsys.readouterr().err.splitlines()

    rc, err = merge(str(a), str(b))
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {b}.bin: token ids span [0, ") and \
        "outside the vocabulary [0, 1000)" in err[0] and "other inputs' .meta.json" in err[0]
    rc, err = merge(str(b), "--vocab-size", "1000")  # no metadata at all: the user's vocabulary
    assert rc == 1 and len(err) == 1 and "--vocab-size gives 1000 ids" in err[0], err
    rc, err = merge(str(a), "--vocab-size", "4096")
    assert rc == 1 and err == [f"error: inputs disagree on the vocabulary size: {a}.meta.json "
                               "says 1000, --vocab-size says 4096"]
    assert not list(tmp_path.glob("m.*"))
    rc, err = merge(str(b), "--vocab-size", "4096")  # the right vocabulary: merged
    assert rc == 0 and err == []
    rc, err = merge(str(b))  # nothing to check against: merged, with a warning naming it
    assert rc == 0 and err == [f"warning: {b}: no .meta.json and no known vocabulary, so the "
                               "tokenizer was not checked (pass --vocab-size)"]


def test_streaming_writer_bytes_across_index_blocks(tmp_path, monkeypatch):
    """The writer streams the index through temporary files in blocks (memory flat in the
    corpus size): with tiny blocks, documents, empty documents and merged datasets still give
    exactly the bytes of megatron-core's IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_latentcot.data import indexed_writer

    monkeypatch.setattr(indexed_writer, "_BLOCK", 3)
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 70000, size=n).tolist() for n in rng.integers(0, 9, size=40)]
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for d in docs + docs[:17]:
        ref.add_document(np.array(d, dtype=np.int64), [len(d)] if d else [])
    ref.finalize(str(tmp_path / "ref.idx"))
    with IndexedWriter(tmp_path / "part", 70000) as w:  # int32 ids: 70000 > 65499
        for d in docs[:17]:
            w.add_document(d)
        part = w.finalize()
    assert (part.documents, part.tokens) == (17, sum(map(len, docs[:17])))
    with IndexedWriter(tmp_path / "out", 70000) as w:
        w.add_documents(np.concatenate([np.array(d, dtype=np.int64) for d in docs]),
                        np.array([len(d) for d in docs]))
        w.add_index(validate_indexed(part.prefix))
        info = w.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"out{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    assert info == validate_indexed(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out.bin", "out.idx", "part.bin", "part.idx", "ref.bin", "ref.idx"]  # no temporary files


def test_writer_turns_a_failed_write_into_one_error(tmp_path):
    """The file system refusing a write (here a file size limit, EFBIG, as a full disk gives
    ENOSPC): one IndexedDatasetError naming the dataset, and no temporary files left."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    try:
        with IndexedWriter(tmp_path / "x", 100) as w:
            w.add_document([1, 2, 3])
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
            with pytest.raises(IndexedDatasetError, match=r"x: cannot write the dataset \(File"):
                w.add_documents(np.ones(1 << 20, dtype=np.uint16), np.array([1 << 20]))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert list(tmp_path.iterdir()) == []
