"""One way to find a run's tokenizer (``data.tokenizer.find_tokenizer``) and its embedding rows
(``vocab.resolve_vocab``): files or directories (a GPT-2 vocab/merges pair), relative paths
under a run directory first, fingerprints checked; no megatron-core import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_latentcot.config import ConfigError, load_config
from megatron_latentcot.data.tokenizer import TokenizerError, build_tokenizer, find_tokenizer


@pytest.fixture
def pair(tmp_path: Path, gpt2_tokenizer_path: Path) -> Path:
    d = tmp_path / "run" / "tok"
    d.mkdir(parents=True)
    shutil.copy(gpt2_tokenizer_path.parent / "encoder.json", d / "vocab.json")
    shutil.copy(gpt2_tokenizer_path.parent / "vocab.bpe", d / "merges.txt")
    return d


def test_find_tokenizer_files_directories_and_fingerprints(pair, tmp_path, sp_tokenizer_path,
                                                          hf_tokenizer_path, monkeypatch):
    ref = build_tokenizer("GPT2BPETokenizer", vocab_file=pair / "vocab.json",
                          merge_file=pair / "merges.txt")
    run = pair.parent
    monkeypatch.chdir(tmp_path)
    # a directory, the vocab file of the pair, relative to a base or to the working directory
    for path, bases in ((pair, ()), (pair / "vocab.json", ()), ("tok", (run,)),
                        ("run/tok", (tmp_path / "elsewhere",))):
        tok = find_tokenizer("GPT2BPETokenizer", path, bases, ref.fingerprint)
        assert tok is not None and tok.fingerprint == ref.fingerprint, path
    assert find_tokenizer("gpt2bpe", "nowhere", (run,)) is None
    assert find_tokenizer("gpt2bpe", None) is None
    with pytest.raises(TokenizerError, match="fingerprint differs"):
        find_tokenizer("gpt2bpe", pair, fingerprint="0" * 64)
    # a base's copy is preferred over the working directory's
    (tmp_path / "tok").mkdir()
    shutil.copy(pair / "vocab.json", tmp_path / "tok" / "vocab.json")
    lines = (pair / "merges.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "tok" / "merges.txt").write_text("\n".join(lines[:-10]) + "\n", encoding="utf-8")
    assert find_tokenizer("gpt2bpe", "tok", (run,)).fingerprint == ref.fingerprint
    assert find_tokenizer("gpt2bpe", "tok").fingerprint != ref.fingerprint
    # the other backends: a .json on a sentencepiece config is an HF tokenizer.json
    assert find_tokenizer("sentencepiece", sp_tokenizer_path).tokenizer_type == "sentencepiece"
    assert find_tokenizer("sentencepiece", hf_tokenizer_path).tokenizer_type == "huggingface"
    with pytest.raises(TokenizerError, match="needs a vocab file and a merge file"):
        find_tokenizer("gpt2bpe", tmp_path / "run")  # no pair in it


def test_export_writes_files_that_find_tokenizer_reads_back(pair, tmp_path, sp_tokenizer):
    ref = build_tokenizer("gpt2bpe", pair)
    rec = ref.export(tmp_path / "out", model_max_length=64)
    assert rec == {"type": "gpt2bpe", "file": ".", "fingerprint": ref.fingerprint,
                   "eod": 50256, "vocab_size": 50257}
    back = find_tokenizer(rec["type"], rec["file"], (tmp_path / "out",), rec["fingerprint"])
    assert back.encode("Hello world") == ref.encode("Hello world") == [15496, 995]
    rec = sp_tokenizer.export(tmp_path / "sp")
    assert rec["file"] == "tokenizer.model" and find_tokenizer(
        "sentencepiece", rec["file"], (tmp_path / "sp",), rec["fingerprint"]) is not None


def test_resolve_vocab_pads_the_pair_and_names_what_is_missing(pair):
    from megatron_latentcot.plan import resolve_vocab as plan_resolve
    from megatron_latentcot.vocab import resolve_vocab

    cfg = load_config(None, ["data.tokenizer_type=GPT2BPETokenizer",
                             f"data.tokenizer_model={pair}"])
    assert resolve_vocab(cfg, 1) == plan_resolve(cfg, 1, None) == 50304  # 50257 -> x128
    assert resolve_vocab(cfg, 2) == 50432  # x256
    assert resolve_vocab(cfg, 2, override=7) == 7
    rel = load_config(None, ["data.tokenizer_type=GPT2BPETokenizer", "data.tokenizer_model=tok"])
    assert resolve_vocab(rel, 1, bases=(pair.parent,)) == 50304
    with pytest.raises(ConfigError, match="data.tokenizer_model=tok is not found"):
        resolve_vocab(rel, 1)
    with pytest.raises(ConfigError, match="no tokenizer is configured"):
        resolve_vocab(load_config(None, []), 1)
    with pytest.raises(ConfigError, match="model.vocab_size is null and the tokenizer could not"):
        resolve_vocab(load_config(None, ["data.tokenizer_type=GPT2BPETokenizer",
                                         f"data.tokenizer_model={pair.parent}"]), 1)


def test_padding_is_megatrons_and_imports_no_megatron_core(pair):
    """The one padding rule (training, planner and tools all call it): ``model.vocab_size``
    when set, else the smallest multiple of make_vocab_size_divisible_by x TP that holds the
    tokenizer's ids (Megatron's: GPT-2's 50257 -> 50304)."""
    from megatron_latentcot.vocab import padded_vocab_size

    for overrides in ([], ["model.make_vocab_size_divisible_by=64"], ["model.vocab_size=60000"]):
        m = load_config(None, overrides).model
        for raw, tp in ((50257, 1), (50257, 4), (96, 2), (4096, 8)):
            step = m.make_vocab_size_divisible_by * tp
            want = m.vocab_size or next(n for n in range(raw, raw + step) if n % step == 0)
            assert padded_vocab_size(m, raw, tp) == want
    assert padded_vocab_size(load_config(None, []).model, 50257, 1) == 50304
    code = ("import sys; from megatron_latentcot.config import Config; "  # (not load_config:
            "from megatron_latentcot.vocab import resolve_vocab; "  # its checks are not ours)
            f"cfg = Config(); cfg.data.tokenizer_type = 'gpt2bpe'; cfg.data.tokenizer_model = '{pair}'; "
            "print(resolve_vocab(cfg, 1), 'megatron.core' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["50304", "False", "False"]
