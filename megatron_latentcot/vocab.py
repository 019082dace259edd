"""Embedding rows of a run: the one resolver for tools that must know them before any model
exists (``plan``, the FLOPs comparison), importing neither torch nor megatron-core.

The tokenizer is found as inference finds it (:func:`data.tokenizer.find_tokenizer`: a file or
a directory such as GPT-2's vocab/merges pair, a relative path under given bases first) and
padded as training pads it (:func:`padded_vocab_size`, which ``model.llama`` re-exports).
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_latentcot.config import Config, ConfigError, ModelConfig

__all__ = ["padded_vocab_size", "resolve_vocab"]


def padded_vocab_size(cfg: ModelConfig, tokenizer_vocab: int, tp_size: int) -> int:
    """The embedding rows: ``model.vocab_size``, or the tokenizer's vocab padded like Megatron
    (a multiple of ``make_vocab_size_divisible_by`` x TP, so every TP rank holds equal rows)."""
    if cfg.predicted_vocab_size is not None and cfg.predicted_vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.predicted_vocab_size ({cfg.predicted_vocab_size}) is smaller "
                          f"than the tokenizer's vocabulary ({tokenizer_vocab}): its last ids "
                          "could never be predicted")
    if cfg.vocab_size is not None:
        if cfg.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the "
                              f"tokenizer's vocabulary ({tokenizer_vocab})")
        return cfg.vocab_size
    multiple = cfg.make_vocab_size_divisible_by * tp_size
    rows = max(tokenizer_vocab, cfg.predicted_vocab_size or 0)  # an imported model's may be more
    return int(math.ceil(rows / multiple) * multiple)


def resolve_vocab(cfg: Config, tp: int, override: int | None = None,
                  bases: tuple[str | Path | None, ...] = (), flag: str = "--vocab-size") -> int:
    """``override`` (``--vocab-size``), else ``model.vocab_size``, else the configured tokenizer's
    vocabulary padded for ``tp`` tensor ranks. ``bases``: directories a relative
    ``data.tokenizer_model`` is looked up in first (a run directory). Raises ConfigError, whose
    message tells to pass ``flag`` (the caller's option for ``override``)."""
    if override is not None:
        return override
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    path = cfg.data.tokenizer_model
    if not path:
        raise ConfigError("model.vocab_size is null and no tokenizer is configured "
                          f"(data.tokenizer_model): pass {flag}")
    from megatron_latentcot.data.tokenizer import find_tokenizer

    try:
        tok = find_tokenizer(cfg.data.tokenizer_type, path, bases)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"model.vocab_size is null and the tokenizer could not be read "
                          f"({e}); pass {flag}") from None
    if tok is None:
        raise ConfigError(f"model.vocab_size is null and data.tokenizer_model={path} is not "
                          f"found; pass {flag}")
    return padded_vocab_size(cfg.model, tok.vocab_size, tp)
