"""One small tokenizer interface over sentencepiece ``.model`` and HF ``tokenizer.json`` files.

Everything downstream (preprocessing, datasets, evaluation, generation) needs only five things
from a tokenizer: ``encode``, ``decode``, ``vocab_size``, the end-of-document id ``eod`` that
separates packed documents, and a ``fingerprint`` so a dataset built with one tokenizer is never
silently read with another. Keeping the interface that small lets either backend be swapped in
from a path alone.

Tokenizers keep the raw file bytes and rebuild their backend from them when unpickled, so a
multiprocessing worker gets an identical tokenizer without touching the file system again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = [
    "HF_EOD_CANDIDATES",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "TokenizerFileNotFoundError",
    "build_tokenizer",
]

# Searched in this order when a tokenizer.json names no end-of-document token itself.
HF_EOD_CANDIDATES: tuple[str, ...] = (
    "<|endoftext|>",  # GPT-2 / GPT-NeoX / Pythia
    "</s>",  # Llama-1/2, Mistral, T5
    "<|end_of_text|>",  # Llama-3
    "<eos>",  # Gemma
    "[EOS]",
    "<|eos|>",
)

_SENTENCEPIECE_ALIASES = {"sentencepiece", "spm", "sentencepiecetokenizer",
                          "gptsentencepiecetokenizer"}
_HUGGINGFACE_ALIASES = {"huggingface", "hf", "huggingfacetokenizer", "tokenizers"}


class TokenizerError(ValueError):
    """A tokenizer file or argument is unusable; the message says which and why."""


class TokenizerFileNotFoundError(TokenizerError, FileNotFoundError):
    """The tokenizer file does not exist (a ValueError and a FileNotFoundError)."""


class Tokenizer:
    """Base class every backend implements; code against this, not the backends.

    Attributes:
        vocab_size: number of ids the tokenizer can emit (every id is in ``[0, vocab_size)``).
        eod: end-of-document id appended between packed documents.
        fingerprint: sha256 (hex) of the tokenizer file bytes.
        tokenizer_type: canonical backend name, ``"sentencepiece"`` or ``"huggingface"``.
        path: the file the tokenizer was loaded from.
    """

    vocab_size: int
    eod: int
    fingerprint: str
    tokenizer_type: str
    path: str

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added (documents are separated by ``eod``)."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; backends override this with their faster batch path."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; raises TokenizerError for an id outside ``[0, vocab_size)``."""
        raise NotImplementedError

    def _check_ids(self, ids: list[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < 0 or i >= self.vocab_size]
        if bad:
            raise TokenizerError(
                f"cannot decode id(s) {bad[:5]} with tokenizer {self.path}: ids must be in "
                f"[0, {self.vocab_size})"
            )
        return ids

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"eod={self.eod}, fingerprint={self.fingerprint[:12]}...)"
        )


def _read_bytes(path: Path, expected: str) -> bytes:
    if not path.exists():
        raise TokenizerFileNotFoundError(
            f"tokenizer model file not found: {path} (expected {expected})"
        )
    if path.is_dir():
        raise TokenizerError(f"tokenizer model path {path} is a directory; expected {expected}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(
            f"cannot read tokenizer model file {path}: {exc.strerror or exc}"
        ) from None
    if not data:
        raise TokenizerError(f"tokenizer model file {path} is empty; expected {expected}")
    return data


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file; ``eod`` is the model's EOS id."""

    tokenizer_type = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._data = _read_bytes(Path(path), "a sentencepiece .model file")
        self.fingerprint = hashlib.sha256(self._data).hexdigest()
        self._load()

    def _load(self) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._data)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ detail
            hint = ""
            if self._data.lstrip()[:1] == b"{":
                hint = " (it looks like JSON: use tokenizer type 'huggingface' for tokenizer.json)"
            raise TokenizerError(
                f"{self.path} is not a valid sentencepiece model{hint}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        self._sp = sp
        self.vocab_size = int(sp.GetPieceSize())
        eos = int(sp.eos_id())
        if eos < 0:
            raise TokenizerError(
                f"sentencepiece model {self.path} has no EOS piece (eos_id=-1), so it has no "
                "end-of-document id; retrain it with an eos id (e.g. tools/train_tokenizer.py)"
            )
        self.eod = eos

    def encode(self, text: str) -> list[int]:
        return list(self._sp.Encode(text, out_type=int))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.Encode(list(texts), out_type=int)]

    def decode(self, ids: list[int]) -> str:
        return self._sp.Decode(self._check_ids(ids))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "data": self._data}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._data = state["data"]
        self.fingerprint = hashlib.sha256(self._data).hexdigest()
        self._load()


class HuggingFaceTokenizer(Tokenizer):
    """An HF ``tokenizers`` ``tokenizer.json`` file (a directory holding one is accepted).

    ``eod`` is the id of ``eod_token`` when given, else of the first of ``HF_EOD_CANDIDATES``
    present in the vocabulary.
    """

    tokenizer_type = "huggingface"

    def __init__(self, path: str | Path, eod_token: str | None = None) -> None:
        p = Path(path)
        if p.is_dir() and (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        self.path = str(p)
        self._eod_token = eod_token
        self._data = _read_bytes(p, "an HF tokenizers tokenizer.json file")
        self.fingerprint = hashlib.sha256(self._data).hexdigest()
        self._load()

    def _load(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            text = self._data.decode("utf-8")
            json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            hint = ""
            if self.path.endswith(".model"):
                hint = " (a .model file is sentencepiece: use tokenizer type 'sentencepiece')"
            raise TokenizerError(
                f"{self.path} is not a valid tokenizer.json (not JSON: {exc}){hint}"
            ) from None
        try:
            tok = HFTokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception with serde detail
            raise TokenizerError(
                f"{self.path} is JSON but not a valid HF tokenizers tokenizer.json: {exc}"
            ) from None
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(max(vocab.values(), default=-1) + 1,
                              tok.get_vocab_size(with_added_tokens=True))
        candidates = (self._eod_token,) if self._eod_token else HF_EOD_CANDIDATES
        for name in candidates:
            idx = tok.token_to_id(name)
            if idx is not None:
                self.eod = int(idx)
                break
        else:
            raise TokenizerError(
                f"tokenizer {self.path} has no end-of-document token: none of "
                f"{list(candidates)} is in its vocabulary"
                + ("" if self._eod_token else " (pass eod_token= to name it)")
            )

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encs]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "data": self._data, "eod_token": self._eod_token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._data = state["data"]
        self._eod_token = state["eod_token"]
        self.fingerprint = hashlib.sha256(self._data).hexdigest()
        self._load()


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str | Path, *, eod_token: str | None = None
) -> Tokenizer:
    """Load a tokenizer from ``(type, path)``, the pair configs and workers pass around.

    ``tokenizer_type`` is ``"sentencepiece"`` or ``"huggingface"`` (Megatron's names
    ``SentencePieceTokenizer``/``GPTSentencePieceTokenizer``/``HuggingFaceTokenizer`` and the
    short forms ``spm``/``hf`` are accepted too). ``eod_token`` overrides the HF token search.
    """
    if not isinstance(tokenizer_type, str):
        raise TokenizerError(
            f"tokenizer_type must be a string, got {type(tokenizer_type).__name__}"
        )
    if tokenizer_model is None or str(tokenizer_model) == "":
        raise TokenizerError("tokenizer_model is empty: expected the path of a tokenizer file")
    key = tokenizer_type.strip().lower().replace("-", "").replace("_", "")
    if key in _SENTENCEPIECE_ALIASES:
        if eod_token is not None:
            raise TokenizerError(
                "eod_token is only for huggingface tokenizers; a sentencepiece model's eod is "
                "its eos id"
            )
        return SentencePieceTokenizer(tokenizer_model)
    if key in _HUGGINGFACE_ALIASES:
        return HuggingFaceTokenizer(tokenizer_model, eod_token=eod_token)
    raise TokenizerError(
        f"unknown tokenizer_type {tokenizer_type!r}: expected 'sentencepiece' or 'huggingface'"
    )
