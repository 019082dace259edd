"""Fixed-length training samples from Megatron datasets, on megatron-core's ``GPTDataset``.

megatron-core does the real work: documents are shuffled per epoch (seeded), packed end to end
and cut into windows of ``seq_length + 1`` tokens (``GPTDataset``), several prefixes are blended
by weight (``BlendedDataset``) and the train/valid/test split is by document ratio
(``BlendedMegatronDatasetBuilder``). Its index arrays are cached as ``.npy`` files under
``cache_dir``. This module adds what it leaves to the caller:

* checks before megatron-core sees the data: every ``.bin``/``.idx`` is validated, its tokenizer
  fingerprint compared, and a split that would hold no tokens is an error (``GPTDataset`` loops
  forever on one);
* a cache key that covers the data: megatron-core keys its cache on the path, sizes, seed and
  split only, so a dataset rebuilt in place would silently reuse a stale index; here the hash of
  each ``.idx`` (which is all the indices depend on) is part of the key;
* a cache that survives a kill: megatron-core writes its ``.npy`` files in place and takes "all
  files exist" for a hit, so a build killed mid-write failed every later start. The rank that
  writes the cache checks the files it would load, and builds a missing or damaged set in a
  staging directory, published by renames (``_AtomicIndexCache``);
* a world-size-1 gloo group when none exists (``BlendedDataset`` calls
  ``torch.distributed.get_rank()`` unconditionally when it writes its cache);
* our sample format (below) without the ``[1, T, T]`` attention mask megatron builds per sample;
* ``MicroBatchSampler``/``micro_batches``: Megatron's pretraining sampler, resumable.

Each sample is a dict of tensors: ``tokens`` and ``labels`` (``labels[t] == tokens[t + 1]`` of the
window) int64 ``[seq_length]``, ``loss_mask`` float32 ``[seq_length]`` (0 where the input token is
EOD when ``eod_mask_loss``), and with ``reset_attention_mask`` also ``doc_ids`` int64
``[seq_length]``: the index of each token's document within the sample, counted by the EODs
before it (Megatron's rule), so token t may attend to token s iff ``doc_ids[s] == doc_ids[t]``.

Call ``build_datasets`` on every rank: with ``torch.distributed`` initialized, rank 0 alone
validates and fingerprints the data (the others receive the answer or its error) and builds the
index cache first; the others load it after a barrier.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from megatron_latentcot.config import DataConfig, parse_blend, parse_split
from megatron_latentcot.data.indexed import check_tokenizer, open_indexed, validate_indexed
from megatron_latentcot.fileutil import sha256_file

__all__ = [
    "DatasetError",
    "MicroBatchSampler",
    "SPLITS",
    "SampleDataset",
    "build_datasets",
    "collate",
    "micro_batches",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


class DatasetError(ValueError):
    """The data cannot yield the samples asked for; the message names the data and the fix."""


class _TokenizerInfo:
    """The part of a tokenizer megatron-core's datasets read (vocab size, EOD, a cache id)."""

    def __init__(self, tokenizer: Any) -> None:
        self.vocab_size = int(tokenizer.vocab_size)
        self.eod = int(tokenizer.eod)
        # No ``pad``: megatron-core then pads with -1, an id that never occurs in the data.
        self.unique_identifiers = OrderedDict(
            [("class", type(tokenizer).__name__), ("fingerprint", tokenizer.fingerprint),
             ("vocab_size", self.vocab_size), ("eod", self.eod)])


T = TypeVar("T")


def _loads(path: str) -> bool:
    """Whether ``path`` is a complete ``.npy`` (header and data, as megatron-core mmaps it)."""
    try:
        np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


class _AtomicIndexCache:
    """Mixin for megatron-core datasets that cache index arrays under ``path_to_cache``.

    megatron-core names them ``<hash>-<class>-<split>-<suffix>``, writes them in place and
    loads them when all exist. On the rank that writes (rank 0, or no process group), a set
    with a missing or unreadable file is built in ``.staging-<host>-<pid>`` with the config's
    ``path_to_cache`` pointed there, then renamed into place, ``description.txt`` last. Other
    ranks load what rank 0 published before megatron-core's barrier.
    """

    CACHE_FILES: tuple[str, ...] = ()  # the .npy suffixes megatron-core writes
    config: Any
    unique_description_hash: str

    def _atomic_cache(self, build: Callable[[], T], split: str) -> T:
        import torch.distributed as dist

        cache = self.config.path_to_cache
        if not cache or (dist.is_initialized() and dist.get_rank() != 0):
            return build()
        base = os.path.join(cache, f"{self.unique_description_hash}-{type(self).__name__}-{split}-")
        npys = [base + suffix for suffix in self.CACHE_FILES]
        present = [p for p in npys if os.path.exists(p)]
        if len(present) == len(npys) and os.path.exists(base + "description.txt") and \
                all(map(_loads, npys)):
            return build()  # a hit: megatron-core loads them
        for bad in (p for p in present if not _loads(p)):
            logger.warning("%s: damaged sample index cache file (an interrupted write?); "
                           "rebuilding it", bad)
        host = socket.gethostname()
        for old in os.listdir(cache):  # staging leftovers of killed builds on this host
            pid = old.rsplit("-", 1)[-1]
            if old.startswith(f".staging-{host}-") and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(cache, old), ignore_errors=True)
        stage = os.path.join(cache, f".staging-{host}-{os.getpid()}")
        os.makedirs(stage, exist_ok=True)
        real, self.config = self.config, copy.copy(self.config)
        self.config.path_to_cache = stage
        try:
            out = build()
            for path in [*npys, base + "description.txt"]:
                os.replace(os.path.join(stage, os.path.basename(path)), path)
        finally:
            self.config = real
            shutil.rmtree(stage, ignore_errors=True)
        return out


_CLASSES: Any = None


def _mcore() -> Any:
    """megatron-core's dataset classes, plus our subclasses of them (imported lazily: slow)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    @dataclass
    class SamplesConfig(GPTDatasetConfig):
        # sha256 of each prefix's .idx: part of the cache key, so a rebuilt dataset is re-indexed
        data_fingerprints: list[str] = field(default_factory=list)

    class BlendedSamples(_AtomicIndexCache, BlendedDataset):
        CACHE_FILES = ("dataset_index.npy", "dataset_sample_index.npy")

        def _build_indices(self) -> Any:
            return self._atomic_cache(super()._build_indices, self.split.name)

    class Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls: Any, *args: Any) -> Any:
            cls = BlendedSamples if cls is BlendedDataset else cls
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, *args)

    class GPTSamples(_AtomicIndexCache, GPTDataset):
        CACHE_FILES = ("document_index.npy", "sample_index.npy", "shuffle_index.npy")

        @staticmethod
        def _key_config_attributes() -> list[str]:
            return [*GPTDataset._key_config_attributes(), "data_fingerprints"]

        def _build_document_sample_shuffle_indices(self) -> Any:
            return self._atomic_cache(super()._build_document_sample_shuffle_indices,
                                      self.index_split.name)

        def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
            text, _ = self._query_document_sample_shuffle_indices(int(idx))
            text = torch.from_numpy(np.ascontiguousarray(text, dtype=np.int64))
            tokens, labels = text[:-1].clone(), text[1:].clone()
            eod, pad = self.config.tokenizer.eod, self._pad_token_id
            loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
            if self.config.eod_mask_loss:
                loss_mask[tokens == eod] = 0.0
            loss_mask[labels == pad] = 0.0  # padding exists only in a short last valid sample
            tokens[tokens == pad] = 0
            labels[labels == pad] = 0
            sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
            if self.config.reset_attention_mask:
                is_eod = (tokens == eod).long()
                sample["doc_ids"] = torch.cumsum(is_eod, 0) - is_eod
            return sample

    _CLASSES = (Builder, SamplesConfig, GPTSamples)
    return _CLASSES


class SampleDataset(torch.utils.data.Dataset):
    """One split: ``len`` samples (at least the number asked for), each a dict of tensors.

    ``megatron`` is the underlying megatron-core dataset (``GPTDataset`` or ``BlendedDataset``)
    for inspection, e.g. ``megatron.dataset_index`` of a blend.
    """

    def __init__(self, inner: Any, split: str) -> None:
        self.megatron = inner
        self.split = split

    def __len__(self) -> int:
        return len(self.megatron)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"{self.split} sample {idx} out of range [0, {len(self)})")
        item = self.megatron[idx]
        item.pop("dataset_id", None)  # added by BlendedDataset
        return item

    def __repr__(self) -> str:
        return f"SampleDataset({self.split}, {len(self)} samples, {type(self.megatron).__name__})"


def _check_prefix(prefix: str, tokenizer: Any) -> str:
    """Validate one dataset for ``tokenizer``; returns its ``.idx`` fingerprint."""
    info = validate_indexed(prefix)
    if not check_tokenizer(prefix, tokenizer):
        logger.warning("%s has no .meta.json (not written by tools/preprocess_data.py?): "
                       "cannot check that it was built with %s", prefix, tokenizer.path)
        # Without the metadata's guarantee (its writer checked every id), scan the ids: one
        # beyond the vocabulary would index past the embedding, or under TP be silently
        # masked to a zero embedding and a zero logit.
        validate_indexed(prefix, vocab_size=tokenizer.vocab_size, check_tokens=True)
    if info.tokens == 0:
        raise DatasetError(f"{prefix}: dataset holds no tokens (empty input?)")
    return sha256_file(prefix + ".idx")


def _checked_fingerprints(prefixes: list[str], tokenizer: Any) -> list[str]:
    """:func:`_check_prefix` of every prefix, run once: on rank 0 when distributed.

    The token scan of a dataset without metadata and the hash of its index read the whole
    file; the answer is the same on every rank, so rank 0 computes it and broadcasts it (or its
    error, which every rank then raises) instead of every rank of the job reading the data.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [_check_prefix(p, tokenizer) for p in prefixes]
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = [_check_prefix(p, tokenizer) for p in prefixes]
        except Exception as e:  # every rank raises it, none waits for a broadcast
            dist.broadcast_object_list([str(e)], src=0)
            raise
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):
        raise DatasetError(answer[0])
    return answer[0]


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """A world-size-1 gloo group for the duration, when torch.distributed has none."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _check_splits(prefixes: list[str], lengths: list[np.ndarray], split_matrix: list[Any],
                  num_samples: tuple[int, int, int], split: str) -> list[Any]:
    """Drop splits nobody asked for; refuse a requested split that would hold no tokens."""
    matrix = list(split_matrix)
    for i, name in enumerate(SPLITS):
        if num_samples[i] == 0:
            matrix[i] = None
            continue
        if matrix[i] is None:
            raise DatasetError(f"{num_samples[i]} {name} samples requested, but data.split "
                               f"({split!r}) gives the {name} split no documents")
        for prefix, seq_lengths in zip(prefixes, lengths):
            n = len(seq_lengths)
            beg = int(round(matrix[i][0] * float(n)))
            end = int(round(matrix[i][1] * float(n)))
            if int(seq_lengths[beg:end].sum()) == 0:
                raise DatasetError(
                    f"{prefix}: the {name} split (documents {beg}..{end} of {n}, data.split "
                    f"{split!r}) holds no tokens, but {num_samples[i]} {name} samples were "
                    "requested; use more documents, change data.split, or request 0")
    return matrix


def build_datasets(
    data_cfg: DataConfig,
    tokenizer: Any,
    seq_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
) -> tuple[SampleDataset | None, SampleDataset | None, SampleDataset | None]:
    """Build the (train, valid, test) sample datasets of ``data_cfg``.

    ``num_samples`` is the minimum number of samples per split (0: that split is None); a
    dataset spans whole epochs, so it may be longer. Same inputs, same samples, on every rank and
    every run.
    """
    if seq_length < 1:
        raise DatasetError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise DatasetError(f"num_samples must be three non-negative counts, got {num_samples}")
    num_samples = tuple(int(n) for n in num_samples)  # type: ignore[assignment]
    if not data_cfg.data_path:
        raise DatasetError("data.data_path is empty: expected a dataset prefix (the path of the "
                           ".bin/.idx pair without extension) or a weighted blend")
    prefixes, weights = parse_blend(data_cfg.data_path)
    parse_split(data_cfg.split)  # raises ConfigError on a malformed split
    if weights is not None:  # megatron-core rejects zero weights: leave those prefixes out
        kept = [(p, w) for p, w in zip(prefixes, weights) if w > 0]
        prefixes, weights = [p for p, _ in kept], [w for _, w in kept]
        if len(prefixes) == 1:  # a blend of one is the dataset itself
            weights = None
    fingerprints = _checked_fingerprints(prefixes, tokenizer)
    lengths = [open_indexed(p, validate=False).sequence_lengths for p in prefixes]  # copies
    cache_dir = data_cfg.cache_dir or os.path.join(
        os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"data.cache_dir {cache_dir}: cannot create it ({e.strerror})") from None
    if not os.access(cache_dir, os.W_OK):
        raise DatasetError(f"data.cache_dir {cache_dir}: not writable")

    builder_cls, config_cls, samples_cls = _mcore()
    config = config_cls(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=(prefixes, weights),
        split=data_cfg.split,
        path_to_cache=cache_dir,
        tokenizer=_TokenizerInfo(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=bool(data_cfg.reset_attention_mask),
        eod_mask_loss=bool(data_cfg.eod_mask_loss),
        create_attention_mask=False,
        data_fingerprints=fingerprints,
    )
    config.split_matrix = _check_splits(prefixes, lengths, config.split_matrix, num_samples,
                                        data_cfg.split)
    builder = builder_cls(samples_cls, list(num_samples), lambda: True, config)
    with _process_group() if weights is not None else contextlib.nullcontext():
        try:
            built = builder.build()
        except IndexError as e:  # BlendedDataset: a blend oversamples one of its datasets
            raise DatasetError(f"cannot blend {data_cfg.data_path}: {e}") from None
        except (ValueError, EOFError, OSError) as e:  # rank 0 checked and wrote it: others load
            raise DatasetError(
                f"loading or writing the sample index cache in {cache_dir} failed ({e}); "
                "data.cache_dir must be writable and shared by every rank") from None
    out = [None if d is None else SampleDataset(d, name) for d, name in zip(built, SPLITS)]
    return out[0], out[1], out[2]


class MicroBatchSampler:
    """Megatron-LM's ``MegatronPretrainingSampler``: index lists of one data-parallel rank.

    The global sample stream is ``consumed_samples, consumed_samples + 1, ...``; it is cut into
    global micro-batches of ``micro_batch_size * dp_size`` samples and rank r takes the r-th
    ``micro_batch_size`` of each, i.e. global sample i goes to rank
    ``((i - consumed_samples) // micro_batch_size) % dp_size``. An incomplete last global
    micro-batch is dropped. Resuming with the ``consumed_samples`` reached (a multiple of
    ``micro_batch_size * dp_size`` after whole steps) continues the stream exactly. Usable as a
    ``DataLoader`` ``batch_sampler``.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        if micro_batch_size < 1:
            raise DatasetError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DatasetError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, "
                               f"dp_size={dp_size}")
        if total_samples < 1:
            raise DatasetError("the dataset has no samples")
        if not 0 <= consumed_samples < total_samples:
            raise DatasetError(
                f"consumed_samples ({consumed_samples}) must be in [0, {total_samples}): the "
                "dataset is exhausted; build it with more samples (num_samples)")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (
            self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        lo = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(start + lo, start + lo + self.micro_batch_size))


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample tensors into ``[micro_batch_size, ...]`` tensors."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def micro_batches(dataset: Any, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches from ``consumed_samples`` on (see ``MicroBatchSampler``)."""
    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank,
                                dp_size)
    for indices in sampler:
        yield collate([dataset[i] for i in indices])
