"""Autoregressive generation with the latent loop per new token, for every method.

A batch of prompts of different lengths is packed without padding (padded inputs, left or right,
are accepted by :func:`generate_padded` and unpadded first); the whole batch is prefilled in one
call, then each step feeds every unfinished row's last token through
:class:`~megatron_latentcot.inference.decoder.IncrementalDecoder`, which runs that token's
latent steps over the per-step K/V cache and halts it by the training rule. Sampling is greedy
(temperature 0), or temperature with optional top-k / top-p (nucleus). A row stops at EOD, at a
caller's stop condition, or after ``max_new_tokens``.

Reported: tokens/s (prefill, decode, overall), mean passes per generated token (the latent steps
run at the position that produced it, token pass included) and inference FLOPs per token,
counted from the real active set of every step (``megatron_latentcot.flops``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_latentcot.inference.decoder import IncrementalDecoder


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None


def sample_next(logits: torch.Tensor, cfg: SamplingConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(scores, min(cfg.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        drop = before >= cfg.top_p  # the first token is always kept
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (the stopping EOD excluded)
    steps: list[list[int]]  # passes run at the position that produced each generated token
    finish_reasons: list[str]  # "eod", "stop" or "length"
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_flops: int = 0
    decode_flops: int = 0  # FLOPs of the one-token forward calls after the prefill
    decode_positions: int = 0  # tokens those calls processed
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return sum(len(s) for s in self.steps)

    @property
    def mean_steps(self) -> float:
        n = self.generated_tokens
        return sum(sum(s) for s in self.steps) / n if n else float("nan")

    @property
    def flops_per_token(self) -> float:
        """Forward FLOPs per decoded token (the one-token calls; the prefill's when none ran)."""
        if self.decode_positions:
            return self.decode_flops / self.decode_positions
        return self.prefill_flops / self.prompt_tokens if self.prompt_tokens else float("nan")

    def stats(self) -> dict[str, float]:
        total = self.prefill_seconds + self.decode_seconds
        n = self.generated_tokens
        return {
            "prompts": float(len(self.tokens)), "prompt_tokens": float(self.prompt_tokens),
            "generated_tokens": float(n),
            "prefill_tokens_per_s": self.prompt_tokens / self.prefill_seconds
            if self.prefill_seconds else float("nan"),
            "decode_tokens_per_s": n / self.decode_seconds if self.decode_seconds else float("nan"),
            "tokens_per_s": n / total if total else float("nan"),
            "mean_latent_steps": self.mean_steps,
            "flops_per_token": self.flops_per_token,
            "prefill_flops_per_token": self.prefill_flops / self.prompt_tokens
            if self.prompt_tokens else float("nan"),
        }


StopFn = Callable[[int, list[int]], bool]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(decoder: IncrementalDecoder, prompts: Sequence[Sequence[int]],
             max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
             eod: int | None = None, stop: StopFn | None = None,
             vocab_limit: int | None = None) -> GenerationResult:
    """Continue every prompt (a list of token ids, at least one each) by up to ``max_new_tokens``.

    ``eod`` ends a row (not included in its output); ``stop(row, generated)`` may end it early;
    ``vocab_limit`` forbids ids >= it (the padded embedding rows the tokenizer never emits).
    """
    sampling = sampling or SamplingConfig()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the EOD id as a start)")
    gen = None
    if sampling.seed is not None:
        gen = torch.Generator().manual_seed(sampling.seed)
    b = len(prompts)
    limit = decoder.cfg.model.max_position_embeddings // decoder.slots_per_token
    if b and max(map(len, prompts)) + max_new_tokens > limit:
        import warnings

        warnings.warn(f"prompt + new tokens exceed the model's {limit} positions: RoPE goes past "
                      "what it was trained on", stacklevel=2)
    decoder.reset(b)
    device = decoder.device
    out_tokens: list[list[int]] = [[] for _ in range(b)]
    out_steps: list[list[int]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    result = GenerationResult(out_tokens, out_steps, reasons,
                              prompt_tokens=sum(len(p) for p in prompts))
    if max_new_tokens <= 0 or b == 0:
        return result

    def pick(logits: torch.Tensor) -> list[int]:
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, vocab_limit:] = float("-inf")
        return sample_next(logits, sampling, gen).tolist()

    _sync(device)
    t0 = time.perf_counter()
    out = decoder.extend([list(p) for p in prompts])
    last = torch.cumsum(torch.tensor([len(p) for p in prompts], device=device), 0) - 1
    logits, steps = out.logits[last], out.steps[last].tolist()
    result.prefill_flops = out.flops
    _sync(device)
    t1 = time.perf_counter()
    result.prefill_seconds = t1 - t0
    active = list(range(b))
    for i in range(max_new_tokens):
        chosen = pick(logits)
        still = []
        for row, tok, s in zip(active, chosen, steps):
            if eod is not None and tok == eod:
                reasons[row] = "eod"
                continue
            out_tokens[row].append(tok)
            out_steps[row].append(s)
            if stop is not None and stop(row, out_tokens[row]):
                reasons[row] = "stop"
            elif i + 1 < max_new_tokens:
                still.append(row)
        active = still
        if not active:
            break
        feed: list[list[int]] = [[] for _ in range(b)]
        for row in active:
            feed[row] = [out_tokens[row][-1]]
        out = decoder.extend(feed)
        result.decode_flops += out.flops
        result.decode_positions += len(active)
        logits, steps = out.logits, out.steps.tolist()  # row-major: the order of ``active``
    _sync(device)
    result.decode_seconds = time.perf_counter() - t1
    return result


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Rows of a left- or right-padded batch (mask 1 = real token) -> lists of real ids."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]


def generate_padded(decoder: IncrementalDecoder, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, **kwargs: Any) -> GenerationResult:
    """:func:`generate` on a padded batch (left or right padding, positions from 0 per row)."""
    return generate(decoder, unpad(input_ids, attention_mask), **kwargs)


def stop_on_strings(decode: Callable[[list[int]], str], stops: Sequence[str]) -> StopFn:
    """A stop condition: the decoded continuation contains any of ``stops``."""
    stops = [s for s in stops if s]

    def check(row: int, generated: list[int]) -> bool:
        if not stops:
            return False
        text = decode(generated)
        return any(s in text for s in stops)

    return check


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            j = text.find(s)
            if j >= 0:
                cut = min(cut, j)
    return text[:cut]


def continuation_text(tokenizer: Any, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
    """The text ``ids`` add after ``prompt_ids`` (keeps the leading space a lone decode drops)."""
    prompt_ids = [t for t in prompt_ids if t != tokenizer.eod]
    before = tokenizer.decode(prompt_ids)
    full = tokenizer.decode([*prompt_ids, *ids])
    return full[len(before):] if full.startswith(before) else tokenizer.decode(list(ids))


def generate_text(model: Any, texts: Sequence[str], max_new_tokens: int = 64,
                  sampling: SamplingConfig | None = None, prepend_eod: bool = True,
                  stop_strings: Sequence[str] = (), stop_at_eod: bool = True
                  ) -> tuple[list[str], GenerationResult]:
    """Generate from text prompts with a :class:`~megatron_latentcot.inference.loading.LoadedModel`.

    With ``prepend_eod`` each prompt starts with EOD, as documents do in the training stream.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; pass tokenizer_model when loading it")
    prompts = [([tok.eod] if prepend_eod else []) + tok.encode(t) for t in texts]
    prompts = [p if p else [tok.eod] for p in prompts]
    decoder = IncrementalDecoder(model.stage, model.cfg)
    stop = stop_on_strings(tok.decode, stop_strings) if stop_strings else None
    result = generate(decoder, prompts, max_new_tokens, sampling,
                      eod=tok.eod if stop_at_eod else None, stop=stop,
                      vocab_limit=tok.vocab_size)
    outs = [cut_at_stops(continuation_text(tok, p, ids), stop_strings)
            for p, ids in zip(prompts, result.tokens)]
    return outs, result
