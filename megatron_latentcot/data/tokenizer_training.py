"""Train a sentencepiece tokenizer (BPE or unigram) on JSONL or plain-text files.

The library behind ``tools/train_tokenizer.py`` (command line:
:mod:`megatron_latentcot.cli.train_tokenizer`). :func:`train_sentencepiece` writes
``PREFIX.model``, ``PREFIX.vocab`` and ``PREFIX.json`` (arguments, input hashes, timing).

Why the line splitting: sentencepiece silently skips training lines longer than
``max_sentence_length`` (4192 bytes), and a State of the Union address is one line of 50 KB.
Every document is therefore split at newlines, then after sentence-ending punctuation, and any
piece still too long is cut at whitespace (or, failing that, at a UTF-8 character boundary).

Defaults aim at a lossless pretraining tokenizer (Llama-style): identity normalization, extra
whitespace kept, digits split, byte fallback on, so ``decode(encode(text)) == text`` for any text
(checked on arbitrary Unicode). Ids: unk=0, bos=1, eos=2 (the end-of-document id), no pad piece.
Training is deterministic for the same inputs and arguments (fixed seed, input order kept).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from megatron_latentcot.fileutil import sha256_file

__all__ = ["MODEL_TYPES", "TokenizerTrainingError", "iter_training_lines", "split_document",
           "train_sentencepiece"]

MAX_LINE_BYTES = 4000  # below sentencepiece's default max_sentence_length of 4192
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MODEL_TYPES = ("bpe", "unigram", "char", "word")


class TokenizerTrainingError(ValueError):
    """Bad training input or arguments; the message names the file or option."""


def _split_long(piece: str, max_bytes: int) -> Iterator[str]:
    """Cut ``piece`` into chunks of at most ``max_bytes`` UTF-8 bytes, at whitespace if possible."""
    while len(piece.encode("utf-8")) > max_bytes:
        head = piece.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        cut = head.rfind(" ")
        if cut <= 0:
            cut = len(head)
        yield piece[:cut]
        piece = piece[cut:].lstrip(" ")
    if piece:
        yield piece


def split_document(text: str, max_bytes: int = MAX_LINE_BYTES) -> Iterator[str]:
    """Training lines of one document: newlines, then sentence ends, then length cuts."""
    for line in text.splitlines():
        for sent in _SENTENCE_END.split(line.strip()):
            if sent:
                yield from _split_long(sent, max_bytes)


def _iter_documents(path: Path, json_key: str) -> Iterator[str]:
    """Documents of one input: each JSONL line's ``json_key``, or each plain-text line."""
    is_jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerTrainingError(f"input file not found: {path}") from None
    except OSError as exc:
        raise TokenizerTrainingError(f"cannot read input file {path}: {exc.strerror}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not is_jsonl:
                    yield line
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TokenizerTrainingError(
                        f"{path}:{lineno}: not valid JSON ({exc.msg}); JSONL inputs need one "
                        "JSON object per line (use a .txt name for plain text)"
                    ) from None
                if not isinstance(obj, dict) or not isinstance(obj.get(json_key), str):
                    raise TokenizerTrainingError(
                        f"{path}:{lineno}: expected a JSON object with a string field "
                        f"{json_key!r} (set --json-key)"
                    )
                yield obj[json_key]
        except UnicodeDecodeError as exc:
            raise TokenizerTrainingError(f"{path} is not UTF-8 text: {exc}") from None


def iter_training_lines(
    inputs: Sequence[str | Path], json_key: str = "text", max_bytes: int = MAX_LINE_BYTES
) -> Iterator[str]:
    """All training lines of all inputs, in order (each at most ``max_bytes`` UTF-8 bytes)."""
    for p in inputs:
        for doc in _iter_documents(Path(p), json_key):
            yield from split_document(doc, max_bytes)




def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _Progress:
    """Counts lines/bytes flowing into the trainer and reports every ``every`` lines."""

    def __init__(self, lines: Iterable[str], log: Callable[[str], None], every: int) -> None:
        self.lines, self.log, self.every = lines, log, every
        self.count = self.nbytes = 0
        self.error: TokenizerTrainingError | None = None
        self.t0 = time.perf_counter()

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self.lines:
                self.count += 1
                self.nbytes += len(line.encode("utf-8"))
                if self.count % self.every == 0:
                    self.log(
                        f"  read {self.count:,} lines ({self.nbytes / 1e6:.1f} MB) in "
                        f"{time.perf_counter() - self.t0:.1f}s"
                    )
                yield line
        except TokenizerTrainingError as exc:
            # sentencepiece would bury this in a RuntimeError: keep it for the caller instead.
            self.error = exc


def train_sentencepiece(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    *,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    json_key: str = "text",
    character_coverage: float = 0.9995,
    normalization: str = "identity",
    split_digits: bool = True,
    user_defined_symbols: Sequence[str] = (),
    max_sentences: int = 0,
    num_threads: int | None = None,
    seed: int = 0,
    verbose: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a sentencepiece model; return the path of ``<output_prefix>.model``.

    ``max_sentences`` > 0 trains on a seeded random sample of that many lines (large inputs).
    Each file is written under a temporary name and renamed, so a concurrent reader never sees
    a half-written model; the model file is written last but one (the ``.json`` record last).
    """
    import sentencepiece as spm

    log = log or (lambda _msg: None)
    if not inputs:
        raise TokenizerTrainingError("no input files given (--input)")
    if model_type not in MODEL_TYPES:
        raise TokenizerTrainingError(
            f"model_type {model_type!r} is not one of {list(MODEL_TYPES)}"
        )
    min_vocab = 3 + len(user_defined_symbols) + (256 if byte_fallback else 0) + 1
    if vocab_size < min_vocab:
        raise TokenizerTrainingError(
            f"vocab_size {vocab_size} is too small: at least {min_vocab} needed for the special "
            f"pieces{' and 256 byte-fallback pieces' if byte_fallback else ''}"
        )
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise TokenizerTrainingError(f"input file not found: {p}")
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    spm.set_random_generator_seed(seed)
    progress = _Progress(iter_training_lines(paths, json_key), log, every=100_000)
    log(f"training sentencepiece {model_type} vocab {vocab_size} on {len(paths)} file(s) ...")
    buf = io.BytesIO()
    t0 = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(progress),
            model_writer=buf,  # in memory: a model_prefix would be recorded in the model bytes
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name=normalization,
            remove_extra_whitespaces=normalization != "identity",
            split_digits=split_digits,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=list(user_defined_symbols),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=max_sentences > 0,
            max_sentence_length=4192,
            num_threads=num_threads or min(16, os.cpu_count() or 1),
            minloglevel=0 if verbose else 2,
        )
    except Exception as exc:  # sentencepiece reports bad settings as RuntimeError from C++
        if progress.error is not None:
            raise progress.error from None
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TokenizerTrainingError(
            f"sentencepiece training on {[str(p) for p in paths]} failed: {msg}"
        ) from None
    seconds = time.perf_counter() - t0
    if progress.error is not None:
        raise progress.error
    if progress.count == 0:
        raise TokenizerTrainingError(f"inputs {[str(p) for p in paths]} contain no text")

    model = Path(f"{prefix}.model")
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = "".join(
        f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n" for i in range(sp.GetPieceSize())
    )
    _atomic_write(Path(f"{prefix}.vocab"), vocab.encode("utf-8"))
    _atomic_write(model, buf.getvalue())
    meta = {
        "model": model.name,
        "sentencepiece_version": spm.__version__,
        "args": {
            "vocab_size": vocab_size, "model_type": model_type, "byte_fallback": byte_fallback,
            "json_key": json_key, "character_coverage": character_coverage,
            "normalization": normalization, "split_digits": split_digits,
            "user_defined_symbols": list(user_defined_symbols),
            "max_sentences": max_sentences, "seed": seed,
        },
        "inputs": [
            {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths
        ],
        "training_lines": progress.count,
        "training_bytes": progress.nbytes,
        "train_seconds": round(seconds, 3),
        "model_sha256": sha256_file(model),
    }
    _atomic_write(Path(f"{prefix}.json"), (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    log(
        f"trained in {seconds:.2f}s on {progress.count:,} lines ({progress.nbytes / 1e6:.1f} MB)"
        f" -> {model}"
    )
    return model
