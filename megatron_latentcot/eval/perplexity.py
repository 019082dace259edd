"""Perplexity of whole documents, token-level and per byte, with a sliding window.

Each document is scored as ``[EOD] + tokens``: every token of the document is predicted, the
first from the document boundary alone (as after an EOD in the training stream). Documents
longer than the window are covered by windows of ``window`` input tokens advancing by
``stride``; each token is scored once, in the first window that reaches it, with the up to
``window - stride`` tokens before it as context. ``stride == window`` gives disjoint windows.

Per-byte numbers (``bits_per_byte``, ``byte_perplexity``) divide the same total NLL by the
UTF-8 bytes of the text, so models with different tokenizers compare; ``word_perplexity``
divides by whitespace-separated words (lm-evaluation-harness' convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from megatron_latentcot.eval.scoring import Window, score_windows


@dataclass
class Document:
    ids: list[int]  # the document's tokens (no EOD)
    text: str  # its text (for bytes and words)


@dataclass
class PerplexityResult:
    docs: int = 0
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    nll_sum: float = 0.0  # nats
    steps_sum: int = 0  # passes at the predicting positions
    per_doc_nll: list[float] = field(default_factory=list, repr=False)

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else float("nan")

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.bytes) if self.bytes else float("nan")

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.words) if self.words else float("nan")

    @property
    def mean_steps(self) -> float:
        return self.steps_sum / self.tokens if self.tokens else float("nan")

    def to_dict(self) -> dict[str, float]:
        d = {k: v for k, v in asdict(self).items() if k != "per_doc_nll"}
        d.update(loss=self.loss, token_perplexity=self.token_perplexity,
                 bits_per_byte=self.bits_per_byte, byte_perplexity=self.byte_perplexity,
                 word_perplexity=self.word_perplexity, mean_steps=self.mean_steps)
        return d


def sliding_windows(seq: Sequence[int], window: int, stride: int) -> list[Window]:
    """Windows scoring ``seq[1:]`` once each (``seq[0]`` is context only)."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window (got {window}, {stride})")
    n = len(seq) - 1  # predictions
    out, begin, done = [], 0, 0
    while done < n:
        end = min(begin + window, n)
        out.append(Window(list(seq[begin:end + 1]), first=done + 1 - begin))
        done = end
        begin += stride
    return out


def evaluate_perplexity(model, docs: Sequence[Document], eod: int, window: int,
                        stride: int | None = None, batch_size: int = 8,
                        max_batch_tokens: int | None = None) -> PerplexityResult:
    """Perplexity of ``docs`` under ``model`` (a LoadedModel); see the module docstring."""
    stride = stride or max(1, window // 2)
    windows, owner = [], []
    for d, doc in enumerate(docs):
        ws = sliding_windows([eod, *doc.ids], window, stride) if doc.ids else []
        windows += ws
        owner += [d] * len(ws)
    scored = score_windows(model, windows, batch_size, max_batch_tokens)
    res = PerplexityResult(docs=len(docs))
    per_doc = np.zeros(len(docs))
    for d, s in zip(owner, scored):
        per_doc[d] += float(s.nll.sum())
        res.tokens += len(s.nll)
        res.steps_sum += int(s.steps.sum())
    res.nll_sum = float(per_doc.sum())
    res.per_doc_nll = per_doc.tolist()
    res.bytes = sum(len(doc.text.encode("utf-8")) for doc in docs)
    res.words = sum(len(doc.text.split()) for doc in docs)
    return res


# -- document sources -------------------------------------------------------------------------

def documents_from_texts(texts: Sequence[str], tokenizer) -> list[Document]:
    return [Document(ids, t) for t, ids in zip(texts, tokenizer.encode_batch(list(texts)))]


def documents_from_jsonl(path: str, tokenizer, key: str = "text",
                         max_docs: int | None = None) -> list[Document]:
    from megatron_latentcot.data.corpus import read_jsonl_texts

    texts = read_jsonl_texts(path, key)
    return documents_from_texts(texts[:max_docs] if max_docs else texts, tokenizer)


def documents_from_indexed(prefix: str, tokenizer, max_docs: int | None = None) -> list[Document]:
    """Documents of a Megatron ``.bin/.idx`` dataset (checked against ``tokenizer``).

    A trailing EOD (``--append-eod``) is dropped; the text for byte counts is the decoded tokens.
    """
    from megatron_latentcot.data.indexed import check_tokenizer, open_indexed

    check_tokenizer(prefix, tokenizer)
    reader = open_indexed(prefix)
    out = []
    for arr in reader.documents():
        ids = [int(t) for t in arr]
        if ids and ids[-1] == tokenizer.eod:
            ids = ids[:-1]
        if ids:
            out.append(Document(ids, tokenizer.decode(ids)))
        if max_docs and len(out) >= max_docs:
            break
    return out


def truncate_documents(docs: Sequence[Document], max_tokens: int | None,
                       tokenizer) -> list[Document]:
    """The first documents up to ``max_tokens`` tokens in all (the last one cut to fit)."""
    if not max_tokens:
        return list(docs)
    out, left = [], max_tokens
    for doc in docs:
        if left <= 0:
            break
        if len(doc.ids) <= left:
            out.append(doc)
        else:
            ids = doc.ids[:left]
            out.append(Document(ids, tokenizer.decode(ids)))
        left -= len(doc.ids)
    return out
