"""LAMBADA-style last-word prediction on any JSONL of passages (``{"text": ...}`` per line).

The target is the passage's last whitespace-separated word with its leading space; the context
is everything before it, after an EOD (a document start). As in lm-evaluation-harness'
``lambada_openai``, the target tokens are the tokens of ``context + target`` after those of
``context``; an example is correct when every target token is the model's greedy choice given
the true prefix (which, for the latent methods too, is what greedy decoding would emit:
tests/test_generate.py). Reported: accuracy and ``exp(-mean log p(target))`` over examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_latentcot.eval.scoring import Window, score_windows


@dataclass
class LambadaResult:
    examples: int
    correct: int
    loglikelihood_sum: float
    target_tokens: int
    steps_sum: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(-self.loglikelihood_sum / self.examples) if self.examples else float("nan")

    def to_dict(self) -> dict[str, float]:
        return {"examples": self.examples, "correct": self.correct, "accuracy": self.accuracy,
                "perplexity": self.perplexity, "target_tokens": self.target_tokens,
                "mean_steps": self.steps_sum / self.target_tokens if self.target_tokens
                else float("nan")}


def split_last_word(text: str) -> tuple[str, str]:
    """``"a b c"`` -> (``"a b"``, ``" c"``)."""
    text = text.strip()
    cut = max(text.rfind(" "), text.rfind("\n"))
    if cut <= 0:
        raise ValueError(f"passage has no context before its last word: {text[:60]!r}")
    return text[:cut], text[cut:]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: continuation tokens = tokens(context + continuation) after tokens(context)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:  # trailing spaces belong to the continuation
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[:len(ctx)] != ctx:  # the boundary merged: cut where the context's tokens stop
        ctx = ctx[:-1]
    return ctx, whole[len(ctx):]


def lambada_windows(texts: Sequence[str], tokenizer) -> list[Window]:
    out = []
    for text in texts:
        ctx, target = encode_pair(tokenizer, *split_last_word(text))
        out.append(Window([tokenizer.eod, *ctx, *target], first=1 + len(ctx)))
    return out


def evaluate_lambada(model, texts: Sequence[str], tokenizer, batch_size: int = 8,
                     max_batch_tokens: int | None = None) -> LambadaResult:
    scored = score_windows(model, lambada_windows(texts, tokenizer), batch_size, max_batch_tokens)
    return LambadaResult(
        examples=len(scored), correct=sum(bool(s.greedy.all()) for s in scored),
        loglikelihood_sum=-sum(float(s.nll.sum()) for s in scored),
        target_tokens=sum(len(s.nll) for s in scored),
        steps_sum=sum(int(s.steps.sum()) for s in scored))
