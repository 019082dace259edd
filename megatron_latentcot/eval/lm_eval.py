"""lm-evaluation-harness adapter: our checkpoints as an ``lm_eval`` model named
``megatron-latentcot`` (alias ``mlc``), every method, latent steps included.

    python -m megatron_latentcot.eval.lm_eval run --model megatron-latentcot \\
        --model_args pretrained=runs/tiny --batch_size 8 --tasks lambada_openai

(any lm-eval command line; this module registers the model first), or from Python::

    import lm_eval
    from megatron_latentcot.eval.lm_eval import LatentCoTLM
    lm_eval.simple_evaluate(model=LatentCoTLM(pretrained="runs/tiny"), tasks=[...])

Log-likelihoods are teacher-forced with the training forward (equal to step-by-step decoding,
tests/test_generate.py); every request starts after an EOD, the document boundary of the
training stream. ``generate_until`` decodes with the KV-cached latent loop. Needs the project's
``eval`` extra: ``pip install -e ".[eval]"`` (lm-eval).
"""

from __future__ import annotations

import json
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as e:  # say which extra, not only which module
    _hint = f'{e}: the lm-eval adapter needs the eval extra: pip install -e ".[eval]"'
    if __name__ == "__main__":
        raise SystemExit(_hint) from None
    raise ModuleNotFoundError(_hint, name=e.name) from None

if __name__ == "__main__":  # ``python -m``: run with the package module's class, registered once
    from megatron_latentcot.eval.lm_eval import main as _main

    raise SystemExit(_main())

from megatron_latentcot.eval.lambada import encode_pair
from megatron_latentcot.eval.scoring import Window, score_windows
from megatron_latentcot.inference.decoder import IncrementalDecoder
from megatron_latentcot.inference.generate import (
    SamplingConfig,
    continuation_text,
    cut_at_stops,
    generate,
    stop_on_strings,
)
from megatron_latentcot.inference.loading import LoadedModel, load_model, parse_dtype


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):  # e.g. batch_size="auto"
        return default


@register_model("megatron-latentcot", "mlc")
class LatentCoTLM(LM):
    """An lm-eval ``LM`` over a checkpoint, latent export, or an in-memory LoadedModel."""

    def __init__(self, pretrained: str | None = None, model: LoadedModel | None = None,
                 device: str | None = "cpu", dtype: str = "float32", batch_size: Any = 8,
                 max_length: Any = None, max_gen_toks: Any = 256,
                 tokenizer_model: str | None = None, **_: Any) -> None:
        super().__init__()
        if model is None:
            if device is None or (str(device).startswith("cuda")
                                  and not torch.cuda.is_available()):
                device = "cpu"  # lm-eval's CLI asks for cuda by default
            if pretrained is None:
                raise ValueError("pass pretrained=<checkpoint or export directory>")
            model = load_model(pretrained, device=device, dtype=parse_dtype(dtype),
                               tokenizer_model=tokenizer_model)
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer; pass tokenizer_model=<file>")
        self.model, self.tok = model, model.tokenizer
        self.batch_size = _int_or(batch_size, 8)
        self.max_length = _int_or(max_length, model.cfg.data.seq_length)
        self.max_gen_toks = _int_or(max_gen_toks, 256)
        self._device = model.device
        self.latent_steps: list[int] = []  # passes of every scored / generated token, for stats

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    # -- log-likelihoods ----------------------------------------------------------------
    def _score(self, windows: list[Window]):
        scored = score_windows(self.model, windows, self.batch_size)
        for s in scored:
            self.latent_steps += s.steps.tolist()
        return scored

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        windows = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = encode_pair(self.tok, context, continuation) if context else \
                ([], self.tok.encode(continuation))
            tokens = [self.tok.eod, *ctx, *cont]
            if not cont:
                raise ValueError(f"empty continuation for context {context[-40:]!r}")
            tokens = tokens[-(self.max_length + 1):]  # left-truncate the context
            windows.append(Window(tokens, first=max(1, len(tokens) - len(cont))))
        out = []
        for req, s in zip(requests, self._score(windows)):
            res = (-float(s.nll.sum()), bool(s.greedy.all()))
            self.cache_hook.add_partial("loglikelihood", req.args, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Disjoint windows of ``max_length`` tokens, full context for the last (lm-eval's rule)."""
        from lm_eval import utils

        windows, owner = [], []
        for i, req in enumerate(requests):
            pairs = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok.encode(req.args[0]), prefix_token=self.tok.eod,
                max_seq_len=self.max_length, context_len=1))
            for ctx, cont in pairs:
                windows.append(Window([*ctx, *cont], first=len(ctx)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(windows)):
            totals[i] -= float(s.nll.sum())
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        decoder = IncrementalDecoder(self.model.stage, self.model.cfg)
        for key, idx in groups.items():
            kwargs = dict(json.loads(key))
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = _int_or(kwargs.pop("max_gen_toks", self.max_gen_toks), self.max_gen_toks)
            sampling = SamplingConfig(
                temperature=float(kwargs.get("temperature", 0.0))
                if kwargs.get("do_sample", False) else 0.0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                top_k=_int_or(kwargs.get("top_k", 0), 0), seed=kwargs.get("seed"))
            max_ctx = max(1, self.max_length - max_gen)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                prompts = [([self.tok.eod] + self.tok.encode(requests[i].args[0]))[-max_ctx:]
                           for i in chunk]
                res = generate(decoder, prompts, max_gen, sampling, eod=self.tok.eod,
                               stop=stop_on_strings(self.tok.decode, until),
                               vocab_limit=self.tok.vocab_size)
                for i, p, ids, steps in zip(chunk, prompts, res.tokens, res.steps):
                    text = cut_at_stops(continuation_text(self.tok, p, ids), until)
                    self.latent_steps += steps
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
        return out  # type: ignore[return-value]


def main() -> None:
    """lm-eval's command line with this model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

