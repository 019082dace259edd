"""Tokenizer interface (sentencepiece + HF tokenizers) and the sentencepiece training tool."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_latentcot.cli import train_tokenizer
from megatron_latentcot.data.corpus import read_jsonl_texts
from megatron_latentcot.data.tokenizer import (
    TOKENIZER_TYPES,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    TokenizerFileNotFoundError,
    build_tokenizer,
)
from megatron_latentcot.data.tokenizer_training import (
    MAX_LINE_BYTES,
    TokenizerTrainingError,
    split_document,
    train_sentencepiece,
)

# ---------------------------------------------------------------------------- sentencepiece


def test_sp_roundtrip_real_text(sp_tokenizer: Tokenizer, corpus_paths) -> None:
    # Out-of-domain text (em-dashes, newlines, archaic spelling) must survive exactly.
    for text in read_jsonl_texts(corpus_paths.heldout) + read_jsonl_texts(corpus_paths.valid):
        assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text


def test_sp_properties(sp_tokenizer: Tokenizer, sp_tokenizer_path: Path, corpus_paths) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_tokenizer_path))
    assert sp_tokenizer.vocab_size == 4096 == sp.GetPieceSize()
    assert sp_tokenizer.eod == sp.eos_id() == 2
    assert sp.IdToPiece(sp_tokenizer.eod) == "</s>"
    assert sp_tokenizer.fingerprint == hashlib.sha256(sp_tokenizer_path.read_bytes()).hexdigest()
    assert sp_tokenizer.tokenizer_type == "sentencepiece"

    valid = read_jsonl_texts(corpus_paths.valid)
    ids = sp_tokenizer.encode(valid[0])
    assert all(0 <= i < sp_tokenizer.vocab_size for i in ids)
    # No BOS/EOS added: documents are separated by eod explicitly downstream.
    assert sp_tokenizer.encode("") == []
    assert sp.bos_id() not in ids and sp_tokenizer.eod not in ids
    assert sp_tokenizer.encode_batch(valid[:3]) == [sp_tokenizer.encode(t) for t in valid[:3]]


def test_sp_compresses_in_domain_better(sp_tokenizer: Tokenizer, corpus_paths) -> None:
    def chars_per_token(path: Path) -> float:
        texts = read_jsonl_texts(path)
        return sum(map(len, texts)) / sum(map(len, sp_tokenizer.encode_batch(texts)))

    valid, heldout = chars_per_token(corpus_paths.valid), chars_per_token(corpus_paths.heldout)
    assert valid > 3.5  # a real BPE, not bytes or characters
    assert valid > heldout + 0.5  # trained on SOTU, so SOTU compresses better than Melville


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_sp_roundtrip_any_text(sp_tokenizer: Tokenizer, text: str) -> None:
    # Identity normalization + byte fallback make the trained tokenizer lossless.
    assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text


def test_pickle_rebuilds_without_the_file(sp_tokenizer_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.model"
    shutil.copy(sp_tokenizer_path, copy)
    tok = build_tokenizer("sentencepiece", copy)
    blob = pickle.dumps(tok)
    copy.unlink()  # workers must not depend on the file still being there
    clone = pickle.loads(blob)
    text = "The state of the Union is strong."
    assert clone.encode(text) == tok.encode(text)
    assert (clone.fingerprint, clone.eod, clone.vocab_size) == (
        tok.fingerprint, tok.eod, tok.vocab_size
    )


def test_one_name_table_for_preprocessing_and_training(sp_tokenizer_path: Path,
                                                       hf_tokenizer_path: Path,
                                                       gpt2_tokenizer_path: Path) -> None:
    """Every name of TOKENIZER_TYPES (Megatron-LM's and ours) builds its backend, and the
    training config accepts exactly those names (case, '-' and '_' aside)."""
    from megatron_latentcot.config import ConfigError, load_config

    model = {"sentencepiece": sp_tokenizer_path, "huggingface": hf_tokenizer_path,
             "gpt2bpe": gpt2_tokenizer_path.parent}
    cls = {"sentencepiece": SentencePieceTokenizer, "huggingface": HuggingFaceTokenizer,
           "gpt2bpe": GPT2BPETokenizer}
    assert {"SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
            "HuggingFaceTokenizer", "GPT2BPETokenizer", "sentencepiece", "huggingface"} <= set(
        TOKENIZER_TYPES)
    for name, backend in TOKENIZER_TYPES.items():
        for spelling in (name, name.upper(), name.replace("Tokenizer", "_tokenizer")):
            tok = build_tokenizer(spelling, model[backend])
            assert type(tok) is cls[backend] and tok.tokenizer_type == backend
        assert load_config(None, [f"data.tokenizer_type={name}"]).data.tokenizer_type == name
    with pytest.raises(ConfigError, match=r"data.tokenizer_type: unknown tokenizer_type "
                                          r"'BertWordPieceCase': expected one of .*Llama2Tok"):
        load_config(None, ["data.tokenizer_type=BertWordPieceCase"])


def test_gpt2_bpe_from_vocab_and_merges(gpt2_tokenizer_path: Path, tmp_path: Path,
                                        corpus_paths) -> None:
    """GPT2BPETokenizer (Megatron-LM's --vocab-file/--merge-file pair) = GPT-2's tokenizer.json
    ids, from explicit files or a directory; its fingerprint covers both files."""
    d = gpt2_tokenizer_path.parent
    ref = build_tokenizer("huggingface", gpt2_tokenizer_path)
    files = build_tokenizer("GPT2BPETokenizer", vocab_file=d / "encoder.json",
                            merge_file=d / "vocab.bpe")
    by_dir = build_tokenizer("GPT2BPETokenizer", d)
    texts = read_jsonl_texts(corpus_paths.heldout)[:3] + ["Hello world", "café 😀 <|endoftext|>"]
    assert files.encode_batch(texts) == by_dir.encode_batch(texts) == ref.encode_batch(texts)
    assert files.encode("Hello world") == [15496, 995]
    assert (files.vocab_size, files.eod, files.tokenizer_type) == (50257, 50256, "gpt2bpe")
    assert files.fingerprint == by_dir.fingerprint != ref.fingerprint
    assert files.decode(files.encode(texts[-1])) == texts[-1]
    clone = pickle.loads(pickle.dumps(files))
    assert (clone.fingerprint, clone.encode(texts[0])) == (files.fingerprint, files.encode(texts[0]))
    # Megatron-LM's download names, HF's names: found in a directory too
    for vocab, merges in (("gpt2-vocab.json", "gpt2-merges.txt"), ("vocab.json", "merges.txt")):
        other = tmp_path / vocab
        other.mkdir()
        shutil.copy(d / "encoder.json", other / vocab)
        shutil.copy(d / "vocab.bpe", other / merges)
        assert build_tokenizer("GPT2BPETokenizer", other).fingerprint == files.fingerprint
    # a changed merges file is another tokenizer
    changed = tmp_path / "changed"
    changed.mkdir()
    shutil.copy(d / "encoder.json", changed / "encoder.json")
    lines = (d / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    (changed / "vocab.bpe").write_text("\n".join(lines[:-1000]) + "\n", encoding="utf-8")
    assert build_tokenizer("GPT2BPETokenizer", changed).fingerprint != files.fingerprint


def test_gpt2_bpe_errors(gpt2_tokenizer_path: Path, tmp_path: Path, sp_tokenizer_path) -> None:
    d = gpt2_tokenizer_path.parent
    with pytest.raises(TokenizerError, match="needs a vocab file and a merge file"):
        build_tokenizer("GPT2BPETokenizer", d / "encoder.json")
    with pytest.raises(TokenizerError, match=f"{tmp_path} holds none"):
        build_tokenizer("GPT2BPETokenizer", tmp_path)
    bad = tmp_path / "bad.bpe"
    bad.write_text("#version: 0.2\nĠ t\nthree parts here\n")
    with pytest.raises(TokenizerError, match=r"bad\.bpe:3: expected a merge 'a b'"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=d / "encoder.json", merge_file=bad)
    with pytest.raises(TokenizerError, match="not a GPT-2 vocab file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=d / "vocab.bpe", merge_file=bad)
    with pytest.raises(TokenizerFileNotFoundError, match="not found"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=tmp_path / "x.json", merge_file=bad)
    with pytest.raises(TokenizerError, match="vocab/merge files are for GPT2BPETokenizer"):
        build_tokenizer("sentencepiece", sp_tokenizer_path, merge_file=bad)


def test_encode_batch_equals_encode_with_threads(sp_tokenizer: Tokenizer, hf_tokenizer: Tokenizer,
                                                 corpus_paths) -> None:
    """The batch path preprocessing uses gives encode()'s ids, threads or not."""
    texts = read_jsonl_texts(corpus_paths.valid)[:4] + ["", " ", "x"]
    for tok in (sp_tokenizer, hf_tokenizer):
        one = [tok.encode(t) for t in texts]
        assert tok.encode_batch(texts) == tok.encode_batch(texts, num_threads=1) == one
        assert tok.encode_batch(texts, num_threads=2) == one


# ---------------------------------------------------------------------------- huggingface


def test_hf_roundtrip_and_properties(hf_tokenizer: Tokenizer, hf_tokenizer_path: Path,
                                     corpus_paths) -> None:
    texts = read_jsonl_texts(corpus_paths.heldout)[:20] + read_jsonl_texts(corpus_paths.valid)
    for text in texts:
        ids = hf_tokenizer.encode(text)
        assert all(0 <= i < hf_tokenizer.vocab_size for i in ids)
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.vocab_size == 1024
    assert hf_tokenizer.eod == 0  # '<|endoftext|>' was the first special token
    assert hf_tokenizer.decode([hf_tokenizer.eod]) == "<|endoftext|>"
    assert hf_tokenizer.fingerprint == hashlib.sha256(hf_tokenizer_path.read_bytes()).hexdigest()
    assert hf_tokenizer.encode("") == []
    # A directory holding tokenizer.json is accepted; pickling round-trips.
    by_dir = build_tokenizer("huggingface", hf_tokenizer_path.parent)
    assert by_dir.fingerprint == hf_tokenizer.fingerprint
    clone = pickle.loads(pickle.dumps(hf_tokenizer))
    assert clone.encode(texts[0]) == hf_tokenizer.encode(texts[0])


def test_hf_gpt2_known_ids(gpt2_tokenizer_path: Path, corpus_paths) -> None:
    tok = build_tokenizer("huggingface", gpt2_tokenizer_path)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert (tok.vocab_size, tok.eod) == (50257, 50256)
    chapter = read_jsonl_texts(corpus_paths.heldout)[0]
    assert tok.decode(tok.encode(chapter)) == chapter


def test_hf_eod_override_and_missing(hf_tokenizer_path: Path, tmp_path: Path) -> None:
    spec = json.loads(hf_tokenizer_path.read_text())
    spec["added_tokens"] = []
    vocab = spec["model"]["vocab"]
    vocab["<pad>"] = vocab.pop("<|endoftext|>")
    path = tmp_path / "no_eod.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=r"no end-of-document token.*<\|endoftext\|>"):
        build_tokenizer("huggingface", path)
    assert build_tokenizer("huggingface", path, eod_token="<pad>").eod == 0


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_missing_file(kind: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="not found: .*nope.model") as info:
        build_tokenizer(kind, missing)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TokenizerFileNotFoundError)


def test_corrupt_sentencepiece(tmp_path: Path, hf_tokenizer_path: Path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(TokenizerError, match=r"bad\.model is not a valid sentencepiece model"):
        build_tokenizer("sentencepiece", bad)
    with pytest.raises(TokenizerError, match="use tokenizer type 'huggingface'"):
        build_tokenizer("sentencepiece", hf_tokenizer_path)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty"):
        build_tokenizer("sentencepiece", empty)


def test_corrupt_huggingface(tmp_path: Path, sp_tokenizer_path: Path) -> None:
    truncated = tmp_path / "tokenizer.json"
    truncated.write_text('{"version": "1.0", "model": {')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        build_tokenizer("huggingface", truncated)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"hello": "world"}')
    with pytest.raises(TokenizerError, match="JSON but not a valid HF tokenizers"):
        build_tokenizer("huggingface", wrong)
    with pytest.raises(TokenizerError, match="use tokenizer type 'sentencepiece'"):
        build_tokenizer("huggingface", sp_tokenizer_path)


def test_unknown_type_and_bad_ids(sp_tokenizer: Tokenizer, sp_tokenizer_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"unknown tokenizer_type 'wordpiece'.*sentencepiece"):
        build_tokenizer("wordpiece", sp_tokenizer_path)
    with pytest.raises(TokenizerError, match=r"ids must be in \[0, 4096\)"):
        sp_tokenizer.decode([5, 4096])
    with pytest.raises(TokenizerError, match="directory"):
        build_tokenizer("sentencepiece", sp_tokenizer_path.parent)


def test_sentencepiece_without_eos_rejected(tmp_path: Path) -> None:
    import sentencepiece as spm

    prefix = tmp_path / "noeos"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 50),
        model_prefix=str(prefix), vocab_size=30, eos_id=-1, minloglevel=2,
    )
    with pytest.raises(TokenizerError, match="no EOS piece"):
        build_tokenizer("sentencepiece", f"{prefix}.model")


# ---------------------------------------------------------------------------- training tool


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab .!?\né"), max_size=12000))
def test_split_document_bounds_and_keeps_text(text: str) -> None:
    lines = list(split_document(text, max_bytes=300))
    assert all(0 < len(line.encode("utf-8")) <= 300 for line in lines)
    # Only whitespace is lost at the cut points.
    assert "".join(lines).replace(" ", "") == "".join(text.split())


def test_sotu_speech_lines_fit_sentencepiece(corpus_paths) -> None:
    speech = read_jsonl_texts(corpus_paths.valid)[0]
    assert len(speech.encode()) > 4192  # one long line: sentencepiece would skip it whole
    lines = list(split_document(speech))
    assert len(lines) > 20
    assert max(len(line.encode()) for line in lines) <= MAX_LINE_BYTES


def test_train_deterministic_and_cli(corpus_paths, tmp_path: Path, capsys) -> None:
    a = train_sentencepiece([corpus_paths.valid], tmp_path / "a", vocab_size=800)
    rc = train_tokenizer.main([
        "--input", str(corpus_paths.valid), "--output-prefix", str(tmp_path / "b"),
        "--vocab-size", "800",
    ])
    assert rc == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "b.model") and "trained in" in out.err
    assert a.read_bytes() == (tmp_path / "b.model").read_bytes()
    meta = json.loads((tmp_path / "b.json").read_text())
    assert meta["args"]["vocab_size"] == 800 and meta["training_lines"] > 12
    assert (tmp_path / "b.vocab").read_text().splitlines()[2] == "</s>\t0"
    tok = build_tokenizer("sentencepiece", a)
    assert (tok.vocab_size, tok.eod) == (800, 2)

    # Unigram + plain-text input + user-defined symbol.
    txt = tmp_path / "moby.txt"
    txt.write_text("\n".join(read_jsonl_texts(corpus_paths.heldout)[:10]))
    u = train_sentencepiece([txt], tmp_path / "u", vocab_size=600, model_type="unigram",
                            user_defined_symbols=["<pause>"])
    tok = build_tokenizer("sentencepiece", u)
    assert tok.encode("<pause>")[-1] == 3 and tok.decode(tok.encode("a <pause> b")) == (
        "a <pause> b"
    )


def test_train_errors(corpus_paths, tmp_path: Path, capsys) -> None:
    with pytest.raises(TokenizerTrainingError, match="input file not found"):
        train_sentencepiece([tmp_path / "missing.jsonl"], tmp_path / "x")
    with pytest.raises(TokenizerTrainingError, match="vocab_size 100 is too small"):
        train_sentencepiece([corpus_paths.valid], tmp_path / "x", vocab_size=100)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(TokenizerTrainingError, match=r"bad.jsonl:2: .*'text'"):
        train_sentencepiece([bad], tmp_path / "x")
    assert train_tokenizer.main(["--input", str(bad), "--output-prefix", str(tmp_path / "x"),
                                 "--json-key", "body"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    # Too large a vocabulary for the input: sentencepiece's complaint, named and wrapped.
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words here\n")
    with pytest.raises(TokenizerTrainingError, match="tiny.txt.*failed: .*[Vv]ocab"):
        train_sentencepiece([tiny], tmp_path / "x", vocab_size=5000)
    assert not (tmp_path / "x.model").exists()
