"""tools/preprocess_data.py: Megatron-LM byte compatibility, real-data round trips, bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_latentcot.cli import preprocess_data
from megatron_latentcot.cli.preprocess_data import main
from megatron_latentcot.data import preprocess as engine
from megatron_latentcot.data.indexed import IndexedReader, read_meta, validate_indexed
from megatron_latentcot.data.tokenizer import Tokenizer, build_tokenizer

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


SP_1K = ("--tokenizer-model", GOLDEN / "sotu_bpe1k.model")
GOLDENS = [  # (input, tokenizer flags, extra flags, Megatron-LM's output in tests/golden)
    ("sotu_small", ("SentencePieceTokenizer", *SP_1K), (), "sotu_small"),
    ("sotu_small", ("Llama2Tokenizer", *SP_1K), (), "sotu_small"),
    ("sotu_small", ("GPT2BPETokenizer",), (), "sotu_small_gpt2"),
    ("unicode_stress", ("SentencePieceTokenizer", *SP_1K), (), "unicode_stress"),
    ("unicode_stress", ("GPT2BPETokenizer",), (), "unicode_stress_gpt2"),
    ("sotu_small", ("SentencePieceTokenizer", *SP_1K), ("--partitions", "3"),
     "sotu_small_partitions3"),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name, tokenizer, extra, golden", GOLDENS,
                         ids=[g[-1] + "-" + g[1][0] for g in GOLDENS])
def test_golden_byte_identical_to_megatron_lm(tmp_path, capsys, monkeypatch, gpt2_tokenizer_path,
                                              name, tokenizer, extra, golden, workers):
    """Same JSONL + tokenizer (+ --partitions) as tests/golden -> the .bin/.idx bytes
    Megatron-LM wrote, for both tokenizer kinds, with 1 or 2 threads over 4-line chunks."""
    monkeypatch.setattr(engine, "CHUNK_LINES", 4)  # many chunks in flight, finishing out of order
    gpt2 = gpt2_tokenizer_path.parent
    files = ("--vocab-file", gpt2 / "encoder.json", "--merge-file", gpt2 / "vocab.bpe")
    rc, out, err = run_tool(
        capsys, "--input", GOLDEN / f"{name}.jsonl", "--json-keys", "text", "--output-prefix",
        tmp_path / name, "--tokenizer-type", tokenizer[0], *(tokenizer[1:] or files),
        "--append-eod", "--workers", workers, *extra)
    assert rc == 0, err
    assert outputs(tmp_path / name) == ((GOLDEN / f"{golden}_text_document.bin").read_bytes(),
                                        (GOLDEN / f"{golden}_text_document.idx").read_bytes())
    assert leftovers(tmp_path) == [f"{name}_text_document{e}" for e in (".bin", ".idx",
                                                                       ".meta.json")]
    if name == "sotu_small":
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
    monkeypatch.setattr(engine, "CHUNK_LINES", 7)
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
        main(["--input", "x", "--output-prefix", "o", "--tokenizer-type", "BertWordPieceCase",
              "--tokenizer-model", "m"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown tokenizer_type 'BertWordPieceCase'" in err
    assert "GPT2BPETokenizer" in err and "Llama2Tokenizer" in err  # the accepted names
    with pytest.raises(SystemExit):
        main(["--input", "x", "--output-prefix", "o", "--tokenizer-type", "sentencepiece"])
    assert "--tokenizer-model is required" in capsys.readouterr().err
    src = _write_lines(tmp_path / "in.jsonl", [GOOD])
    rc, _, err = run_tool(capsys, "--input", src, "--output-prefix", tmp_path / "o",
                          "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", src)
    assert rc == 1 and "needs a vocab file and a merge file" in err and "Traceback" not in err
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


class _UnderReportingTokenizer(Tokenizer):
    """Real sentencepiece ids, but a vocab_size that claims fewer ids than it emits."""

    tokenizer_type = "sentencepiece"

    def __init__(self, inner) -> None:
        self.inner, self.path, self.fingerprint = inner, inner.path, inner.fingerprint
        self.vocab_size, self.eod = 50, inner.eod

    def encode(self, text):
        return self.inner.encode(text)


def test_token_id_beyond_vocab_is_an_error(tmp_path, capsys, sp_tokenizer, monkeypatch):
    monkeypatch.setattr(preprocess_data, "build_tokenizer",
                        lambda *args, **kwargs: _UnderReportingTokenizer(sp_tokenizer))
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


# --------------------------------------------------------------------------- streaming engine


def _generated_corpus(path: Path, real_texts: list[str]) -> list[str]:
    """Real addresses, random unicode (astral planes too), empty documents and one very long
    document (larger than a chunk), one JSON line each."""
    import random

    rng = random.Random(0)
    alphabets = ["abc xyz ,.!?", "àéîõüßçñ", "αβγδ ΑΒΓ", "日本語中文한국어", "😀👍🏽🇺🇸‍",
                 "𝔘𝔫𝔦𝔠𝔬𝔡𝔢𐌰𐌱", "\t\n \u00a0\u200b"]
    texts: list[str] = []
    for i in range(60):
        if i % 7 == 3:
            texts.append("")
        elif i % 5 == 0:
            texts.append(real_texts[i % len(real_texts)])
        else:
            chars = "".join(rng.choice(alphabets))
            texts.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 400))))
    texts.insert(30, " ".join(real_texts) * 2)  # ~1 MB: one document, several chunks' worth
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=bool(i % 2)) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return texts


@pytest.mark.parametrize("kind", ["sentencepiece", "gpt2"])
def test_generated_corpus_reads_back_and_workers_agree(tmp_path, capsys, monkeypatch, kind,
                                                       corpus_paths, sp_tokenizer,
                                                       gpt2_tokenizer_path):
    """megatron-core's reader returns tokenizer.encode(text) + [eod] for every document (empty
    ones recorded without a sequence), identically for 1, 2 and 3 threads."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    monkeypatch.setattr(engine, "CHUNK_BYTES", 16 << 10)
    texts = _generated_corpus(tmp_path / "in.jsonl", [
        json.loads(line)["text"] for line in open(corpus_paths.valid, encoding="utf-8")])
    if kind == "gpt2":
        tok = build_tokenizer("GPT2BPETokenizer", gpt2_tokenizer_path.parent)
        flags = ["--tokenizer-type", "GPT2BPETokenizer", "--tokenizer-model", tok.path.rsplit(
            "/", 1)[0]]
    else:
        tok = sp_tokenizer
        flags = ["--tokenizer-type", "sentencepiece", "--tokenizer-model", tok.path]
    for workers in (1, 2, 3):
        rc, _, err = run_tool(capsys, "--input", tmp_path / "in.jsonl", "--output-prefix",
                              tmp_path / f"w{workers}", "--append-eod", "--workers", workers,
                              *flags)
        assert rc == 0, err
    assert outputs(tmp_path / "w1") == outputs(tmp_path / "w2") == outputs(tmp_path / "w3")
    ds = IndexedDataset(str(tmp_path / "w1_text_document"))
    bounds = ds.document_indices
    assert len(bounds) == len(texts) + 1
    for d, text in enumerate(texts):
        got = [ds[i].tolist() for i in range(bounds[d], bounds[d + 1])]
        ids = tok.encode(text)
        assert got == ([ids + [tok.eod]] if ids else []), f"document {d}"
    assert sum(1 for t in texts if not t) >= 8 and max(map(len, texts)) > 20 * engine.CHUNK_BYTES


def test_tool_imports_neither_torch_nor_megatron_core(tmp_path):
    """Preprocessing and merging run on the tokenizer, numpy and our own writer: importing and
    running both tools (in a fresh interpreter) loads no torch and no megatron-core."""
    import subprocess
    import sys

    src = _write_lines(tmp_path / "in.jsonl", [GOOD, GOOD])
    code = f"""
import sys
from megatron_latentcot.cli.preprocess_data import main
from megatron_latentcot.cli.merge_datasets import main as merge
import megatron_latentcot.data.indexed, megatron_latentcot.config
args = ["--input", {str(src)!r}, "--tokenizer-type", "sentencepiece", "--tokenizer-model",
        {str(GOLDEN / "sotu_bpe1k.model")!r}, "--append-eod", "--workers", "2"]
assert main(args + ["--output-prefix", {str(tmp_path / "a")!r}]) == 0
assert main(args + ["--output-prefix", {str(tmp_path / "b")!r}, "--partitions", "2"]) == 0
assert merge(["--input", {str(tmp_path / "a_text_document")!r},
              {str(tmp_path / "b_text_document")!r}, "--output-prefix",
              {str(tmp_path / "m")!r}]) == 0
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron", "triton")))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert validate_indexed(tmp_path / "m").documents == 4


def test_partitions_follow_megatron_order(tmp_path, capsys, sp_tokenizer):
    """--partitions P: line i in partition i % P, partitions concatenated (Megatron-LM's order,
    pinned by the partitions golden), for every key, skipped lines keeping their slot;
    --keep-sequential-samples keeps the input order. No partition files are left behind."""
    rows = [{"text": f"Document number {i} of the test.", "title": f"Title {i}"}
            for i in range(11)]
    lines = [json.dumps(r) for r in rows]
    lines[4] = "{broken"
    src = _write_lines(tmp_path / "in.jsonl", lines)
    common = ["--input", src, "--json-keys", "text", "title", "--tokenizer-type",
              "sentencepiece", "--tokenizer-model", sp_tokenizer.path, "--append-eod",
              "--skip-bad-lines", "--workers", "2"]
    assert run_tool(capsys, *common, "--output-prefix", tmp_path / "p", "--partitions", "3")[0] == 0
    assert run_tool(capsys, *common, "--output-prefix", tmp_path / "s", "--partitions", "3",
                    "--keep-sequential-samples")[0] == 0
    assert run_tool(capsys, *common, "--output-prefix", tmp_path / "one")[0] == 0
    order = [i for p in range(3) for i in range(11) if i % 3 == p and i != 4]
    for key in ("text", "title"):
        docs = [d.tolist() for d in IndexedReader(tmp_path / f"p_{key}_document").documents()]
        assert docs == [sp_tokenizer.encode(rows[i][key]) + [sp_tokenizer.eod] for i in order]
        assert outputs(tmp_path / "s", key) == outputs(tmp_path / "one", key)
    assert read_meta(tmp_path / "p_text_document")["partitions"] == 3
    assert not [n for n in leftovers(tmp_path) if n.startswith(".")]


class _FakeTTY:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_progress_line_only_on_a_terminal_or_a_large_input(monkeypatch):
    """A live line (bytes read, tokens/s, ETA) on a terminal; without one, lines only for
    inputs over PROGRESS_MIN_BYTES (so CI logs of small runs stay clean)."""
    stats = engine.Stats(start=engine.time.perf_counter() - 10.0)
    stats.raw_bytes_read, stats.docs, stats.tokens = 25 << 20, 1000, 5_000_000
    tty = _FakeTTY(True)
    progress = engine.Progress(100 << 20, None, tty)
    progress.next_time = 0.0
    progress.update(stats)
    progress.close()
    assert tty.text.startswith("[ 25.0%] 25.0/100.0 MB read, 1,000 docs, 5,000,000 tokens")
    assert "tokens/s" in tty.text and "ETA 0:00:3" in tty.text and tty.text.endswith("\r\n")
    for total, expect_line in ((100 << 20, False), (engine.PROGRESS_MIN_BYTES, True)):
        log = _FakeTTY(False)
        progress = engine.Progress(total, None, log)
        progress.next_time = 0.0
        progress.update(stats)
        progress.close()
        assert bool(log.text) == expect_line and "\r" not in log.text
    log = _FakeTTY(False)  # --log-interval N: a line every N documents, whatever the size
    progress = engine.Progress(100 << 20, 400, log)
    for docs in (300, 500, 700, 900):
        stats.docs = docs
        progress.update(stats)
    assert log.text.count("\n") == 2  # at 500 (past 400) and 900 (past 800)


def test_peak_memory_flat_when_the_corpus_grows(tmp_path):
    """Streaming: preprocessing 4x the documents takes no more peak memory (holding the extra
    documents' token lists would add ~50 MB here)."""
    import subprocess
    import sys

    line = json.dumps({"text": (GOLDEN / "sotu_small.jsonl").read_text()[:1400]}) + "\n"
    peaks = []
    for n in (1200, 4800):  # 1.7 MB already fills the pipeline (2 * workers + 2 chunks)
        (tmp_path / f"in{n}.jsonl").write_text(line * n)
        code = ("import resource, sys\n"  # as the CLI
                "from megatron_latentcot.cli.preprocess_data import main\n"
                f"sys.argv[1:] = ['--input', {str(tmp_path / f'in{n}.jsonl')!r}, "
                f"'--output-prefix', {str(tmp_path / f'o{n}')!r}, '--tokenizer-type', "
                f"'sentencepiece', '--tokenizer-model', {str(GOLDEN / 'sotu_bpe1k.model')!r}, "
                "'--workers', '2']\nrc = main()\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        peaks.append(int(proc.stdout.split()[-1]) / 1024)  # MB
    assert validate_indexed(tmp_path / "o4800_text_document").documents == 4800
    assert peaks[1] < peaks[0] + 20, peaks  # glibc's per-thread arenas vary by a few MB
