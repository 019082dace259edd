"""tools/preprocess_data.py: Megatron-LM byte compatibility, real-data round trips, bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_latentcot.data.indexed import IndexedReader, read_meta, validate_indexed
from megatron_latentcot.data.tokenizer import build_tokenizer
from tools import preprocess_data
from tools.preprocess_data import main

GOLDEN = Path(__file__).parent / "golden"


def run_tool(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def outputs(prefix: Path, key: str = "text") -> tuple[bytes, bytes]:
    base = f"{prefix}_{key}_document"
    return Path(base + ".bin").read_bytes(), Path(base + ".idx").read_bytes()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def real_jsonl(tmp_path_factory: pytest.TempPathFactory, corpus_paths) -> Path:
    """The first 25 State of the Union addresses of the train split (about 1 MB)."""
    path = tmp_path_factory.mktemp("real") / "sotu25.jsonl"
    with open(corpus_paths.train, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as o:
        for _, line in zip(range(25), f):
            o.write(line)
    return path


# --------------------------------------------------------------------------- compatibility


def test_golden_byte_identical_to_megatron_lm(tmp_path, capsys):
    """Same JSONL + tokenizer as tests/golden -> the same .bin/.idx bytes Megatron-LM wrote."""
    rc, out, _ = run_tool(
        capsys, "--input", GOLDEN / "sotu_small.jsonl", "--json-keys", "text",
        "--output-prefix", tmp_path / "sotu_small", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", GOLDEN / "sotu_bpe1k.model", "--append-eod", "--workers", "2")
    assert rc == 0
    ours_bin, ours_idx = outputs(tmp_path / "sotu_small")
    assert ours_bin == (GOLDEN / "sotu_small_text_document.bin").read_bytes()
    assert ours_idx == (GOLDEN / "sotu_small_text_document.idx").read_bytes()
    assert "21 documents (1 empty)" in out


def test_golden_megatron_reader_matches_direct_encoding(tmp_path, capsys):
    """megatron-core's own IndexedDataset reads back exactly tokenizer(text) + [eod]."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert run_tool(capsys, "--input", GOLDEN / "sotu_small.jsonl", "--output-prefix",
                    tmp_path / "g", "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                    GOLDEN / "sotu_bpe1k.model", "--append-eod")[0] == 0
    tok = build_tokenizer("sentencepiece", GOLDEN / "sotu_bpe1k.model")
    texts = [json.loads(line)["text"] for line in open(GOLDEN / "sotu_small.jsonl")]
    expected = [tok.encode(t) + [tok.eod] for t in texts if t]
    ds = IndexedDataset(str(tmp_path / "g_text_document"))
    assert len(ds) == len(expected) == 20
    assert ds.index.dtype == np.uint16
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert len(ds.document_indices) == len(texts) + 1  # the empty document is still recorded


def test_real_corpus_round_trip_and_workers_agree(tmp_path, capsys, real_jsonl, sp_tokenizer):
    for workers in (1, 2):
        rc, out, err = run_tool(
            capsys, "--input", real_jsonl, "--output-prefix", tmp_path / f"w{workers}",
            "--tokenizer-type", "sentencepiece", "--tokenizer-model", sp_tokenizer.path,
            "--append-eod", "--workers", workers, "--log-interval", 10)
        assert rc == 0, err
    assert outputs(tmp_path / "w1") == outputs(tmp_path / "w2")
    texts = [json.loads(line)["text"] for line in open(real_jsonl)]
    reader = IndexedReader(tmp_path / "w1_text_document")
    docs = reader.documents()
    assert len(docs) == len(texts) == 25
    for text, doc in zip(texts, docs):
        assert doc.tolist() == sp_tokenizer.encode(text) + [sp_tokenizer.eod]
    # progress lines and summary report the three rates
    assert "docs/s" in err and "MB/s" in err and "tokens/s" in err
    assert "25 documents" in out and "tokens/s" in out
    meta = read_meta(tmp_path / "w1_text_document")
    assert meta["tokenizer_fingerprint"] == sp_tokenizer.fingerprint
    assert meta["documents"] == 25 and meta["tokens"] == sum(len(d) for d in docs)
    assert meta["vocab_size"] == sp_tokenizer.vocab_size and meta["dtype"] == "uint16"


def test_compressed_inputs_give_identical_output(tmp_path, capsys, real_jsonl, sp_tokenizer):
    import zstandard

    raw = real_jsonl.read_bytes()
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    common = ["--tokenizer-type", "sentencepiece", "--tokenizer-model", sp_tokenizer.path]
    for name, src in (("plain", real_jsonl), ("gz", tmp_path / "in.jsonl.gz"),
                      ("zst", tmp_path / "in.jsonl.zst")):
        assert run_tool(capsys, "--input", src, "--output-prefix", tmp_path / name, *common)[0] == 0
    assert outputs(tmp_path / "plain") == outputs(tmp_path / "gz") == outputs(tmp_path / "zst")


def test_several_inputs_and_keys(tmp_path, capsys, sp_tokenizer):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"text": "The Union is strong.", "title": "One"}) + "\n")
    b.write_text(json.dumps({"text": "We the people.", "title": "Two"}) + "\n")
    rc, out, _ = run_tool(capsys, "--input", a, b, "--json-keys", "text", "title",
                          "--output-prefix", tmp_path / "o", "--tokenizer-type", "spm",
                          "--tokenizer-model", sp_tokenizer.path)
    assert rc == 0
    for key, values in (("text", ["The Union is strong.", "We the people."]),
                        ("title", ["One", "Two"])):
        docs = IndexedReader(tmp_path / f"o_{key}_document").documents()
        assert [d.tolist() for d in docs] == [sp_tokenizer.encode(v) for v in values]


def test_int32_dtype_for_a_large_vocabulary(tmp_path, capsys, real_jsonl):
    """A >= 65500-id vocabulary is stored as int32, and ids above 65535 survive (no wrap)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    words = sorted({w for line in open(real_jsonl) for w in json.loads(line)["text"].split()})
    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    vocab.update({f"<filler_{i}>": len(vocab) for i in range(70000)})
    vocab.update({w: len(vocab) + i for i, w in enumerate(words)})
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    rc, _, err = run_tool(capsys, "--input", real_jsonl, "--output-prefix", tmp_path / "big",
                          "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                          tmp_path / "tokenizer.json", "--append-eod")
    assert rc == 0, err
    reader = IndexedReader(tmp_path / "big_text_document")
    assert reader.dtype == np.int32
    first = json.loads(real_jsonl.read_text().splitlines()[0])["text"]
    assert reader[0].tolist() == [vocab[w] for w in first.split()] + [0]
    assert reader[0].max() > 65535


# --------------------------------------------------------------------------- bad input


def _write_lines(path: Path, lines: list[str | bytes]) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


GOOD = json.dumps({"text": "Fellow citizens of the Senate."})


@pytest.mark.parametrize("bad, expected", [
    ('{"text": "unterminated', "invalid JSON"),
    ('{"body": "no text key"}', "missing key 'text'"),
    ('{"text": 42}', "key 'text' is int, expected a string"),
    ('{"text": null}', "key 'text' is null"),
    ('["a", "list"]', "expected a JSON object, got list"),
    ("", "empty line"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8"),
])
def test_malformed_line_stops_with_file_and_line(tmp_path, capsys, sp_tokenizer, bad, expected):
    src = _write_lines(tmp_path / "in.jsonl", [GOOD, GOOD, bad, GOOD])
    rc, _, err = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "out/o",
                          "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                          sp_tokenizer.path)
    assert rc == 1
    assert f"{src}:3:" in err and expected in err and "--skip-bad-lines" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert leftovers(tmp_path / "out") == []  # nothing written, no temporary files left


def test_skip_bad_lines_counts_them(tmp_path, capsys, sp_tokenizer):
    lines = [GOOD, '{"text": 1}', GOOD, "not json", '{"x": ""}', GOOD]
    src = _write_lines(tmp_path / "in.jsonl", lines)
    clean = _write_lines(tmp_path / "clean.jsonl", [GOOD, GOOD, GOOD])
    common = ["--tokenizer-type", "sentencepiece", "--tokenizer-model", sp_tokenizer.path,
              "--append-eod"]
    rc, out, err = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "s",
                            "--skip-bad-lines", *common)
    assert rc == 0
    assert "skipped 3 bad line(s)" in out
    for n in (2, 4, 5):
        assert f"{src}:{n}:" in err
    assert read_meta(tmp_path / "s_text_document")["skipped_lines"] == 3
    assert run_tool(capsys, "--input", clean, "--output-prefix", tmp_path / "c", *common)[0] == 0
    assert outputs(tmp_path / "s") == outputs(tmp_path / "c")


def test_bad_line_numbers_are_exact_across_chunks(tmp_path, capsys, sp_tokenizer, monkeypatch):
    monkeypatch.setattr(preprocess_data, "CHUNK_LINES", 7)
    lines = [GOOD] * 40
    lines[22] = "{broken"
    src = _write_lines(tmp_path / "in.jsonl", lines)
    rc, _, err = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "o",
                          "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                          sp_tokenizer.path, "--workers", "2")
    assert rc == 1 and f"{src}:23:" in err


def test_all_lines_bad_and_skipped_is_an_error(tmp_path, capsys, sp_tokenizer):
    src = _write_lines(tmp_path / "in.jsonl", ["nope", "nope"])
    rc, _, err = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "o",
                          "--skip-bad-lines", "--tokenizer-type", "sentencepiece",
                          "--tokenizer-model", sp_tokenizer.path)
    assert rc == 1 and "no documents left after skipping 2 bad line(s)" in err


@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("empty.jsonl.gz", None)])
def test_empty_input(tmp_path, capsys, sp_tokenizer, name, content):
    src = tmp_path / name
    src.write_bytes(gzip.compress(b"") if content is None else content)
    rc, _, err = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "out/o",
                          "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                          sp_tokenizer.path)
    assert rc == 1 and f"{src}: input is empty" in err
    assert leftovers(tmp_path / "out") == []


def test_missing_and_corrupt_inputs(tmp_path, capsys, sp_tokenizer):
    common = ["--output-prefix", tmp_path / "o", "--tokenizer-type", "sentencepiece",
              "--tokenizer-model", sp_tokenizer.path]
    rc, _, err = run_tool(capsys, "--input", tmp_path / "nope.jsonl", *common)
    assert rc == 1 and "nope.jsonl: input file not found" in err
    fake_gz = tmp_path / "fake.jsonl.gz"
    fake_gz.write_text(GOOD + "\n")
    rc, _, err = run_tool(capsys, "--input", fake_gz, *common)
    assert rc == 1 and f"{fake_gz}:1: cannot decompress" in err and "Traceback" not in err


def test_missing_or_invalid_tokenizer(tmp_path, capsys):
    src = _write_lines(tmp_path / "in.jsonl", [GOOD])
    rc, _, err = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "o",
                          "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                          tmp_path / "missing.model")
    assert rc == 1 and "missing.model" in err and "not found" in err
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    rc, _, err = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "o",
                          "--tokenizer-type", "sentencepiece", "--tokenizer-model", junk)
    assert rc == 1 and "junk.model" in err and "not a valid sentencepiece model" in err


def test_unknown_tokenizer_type_and_unsupported_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--input", "x", "--output-prefix", "o", "--tokenizer-type", "GPT2BPETokenizer",
              "--tokenizer-model", "m"])
    assert e.value.code == 2 and "GPT2BPETokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input", "x", "--output-prefix", "o", "--tokenizer-type", "sentencepiece",
              "--tokenizer-model", "m", "--split-sentences"])
    assert "not supported" in capsys.readouterr().err


def test_unwritable_output_location(tmp_path, capsys, sp_tokenizer):
    src = _write_lines(tmp_path / "in.jsonl", [GOOD])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    common = ["--input", src, "--tokenizer-type", "sentencepiece", "--tokenizer-model",
              sp_tokenizer.path]
    rc, _, err = run_tool(capsys, *common, "--output-prefix", blocker / "sub" / "o")
    assert rc == 1 and "is not a directory" in err and str(blocker) in err
    if os.path.isdir("/proc/self"):  # writable by nobody, not even root
        rc, _, err = run_tool(capsys, *common, "--output-prefix", "/proc/self/no/such/o")
        assert rc == 1 and "/proc/self/no/such/o" in err and "Traceback" not in err
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        rc, _, err = run_tool(capsys, *common, "--output-prefix", ro / "o")
        assert rc == 1 and "not writable" in err


class _UnderReportingTokenizer:
    """Real sentencepiece ids, but a vocab_size that claims fewer ids than it emits."""

    tokenizer_type = "sentencepiece"

    def __init__(self, inner) -> None:
        self.inner, self.path, self.fingerprint = inner, inner.path, inner.fingerprint
        self.vocab_size, self.eod = 50, inner.eod

    def encode(self, text):
        return self.inner.encode(text)


def test_token_id_beyond_vocab_is_an_error(tmp_path, capsys, sp_tokenizer, monkeypatch):
    monkeypatch.setattr(preprocess_data, "build_tokenizer",
                        lambda kind, path: _UnderReportingTokenizer(sp_tokenizer))
    src = _write_lines(tmp_path / "in.jsonl", [json.dumps({"text": ""}), GOOD])
    rc, _, err = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "out/o",
                          "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                          sp_tokenizer.path)
    assert rc == 1 and f"{src}:2: token id" in err and "outside [0, 50)" in err
    assert leftovers(tmp_path / "out") == []


def test_failed_rerun_leaves_previous_dataset_intact(tmp_path, capsys, sp_tokenizer):
    common = ["--output-prefix", tmp_path / "o", "--tokenizer-type", "sentencepiece",
              "--tokenizer-model", sp_tokenizer.path]
    good = _write_lines(tmp_path / "good.jsonl", [GOOD, GOOD])
    assert run_tool(capsys, "--input", good, *common)[0] == 0
    before = outputs(tmp_path / "o")
    bad = _write_lines(tmp_path / "bad.jsonl", [GOOD] * 5 + ["{oops"])
    assert run_tool(capsys, "--input", bad, *common)[0] == 1
    assert outputs(tmp_path / "o") == before
    validate_indexed(tmp_path / "o_text_document")
    assert not [n for n in leftovers(tmp_path) if ".tmp-" in n]


def test_empty_documents_only(tmp_path, capsys, sp_tokenizer):
    """Documents whose text is empty are kept as empty documents (as Megatron-LM does)."""
    src = _write_lines(tmp_path / "in.jsonl", ['{"text": ""}'] * 3)
    rc, out, _ = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "o",
                          "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                          sp_tokenizer.path, "--append-eod")
    assert rc == 0 and "3 documents (3 empty), 0 tokens" in out
    info = validate_indexed(tmp_path / "o_text_document")
    assert (info.documents, info.sequences, info.tokens) == (3, 0, 0)


@pytest.mark.slow
def test_script_entry_point(tmp_path):
    """``python tools/preprocess_data.py`` works from any directory (no package install)."""
    import subprocess
    import sys

    src = _write_lines(tmp_path / "in.jsonl", [GOOD])
    tool = Path(__file__).resolve().parents[1] / "tools" / "preprocess_data.py"
    shutil.copy(GOLDEN / "sotu_bpe1k.model", tmp_path / "t.model")
    proc = subprocess.run(
        [sys.executable, str(tool), "--input", str(src), "--output-prefix", str(tmp_path / "o"),
         "--tokenizer-type", "sentencepiece", "--tokenizer-model", str(tmp_path / "t.model")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert validate_indexed(tmp_path / "o_text_document").documents == 1
