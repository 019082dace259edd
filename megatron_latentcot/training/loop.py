"""The pretraining loop: data -> micro-batches -> pipeline forward/backward -> ZeRO step.

Reads top to bottom: ``Trainer.__init__`` builds everything, ``train`` iterates, logs,
evaluates and checkpoints. Every rank runs the same code; only the last pipeline stage sees
losses, and only the logging rank prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_latentcot.config import Config, ConfigError
from megatron_latentcot.flops import peak_tflops
from megatron_latentcot.model.latent import LatentStepScheduler
from megatron_latentcot.model.llama import LlamaStage, init_weights, padded_vocab_size
from megatron_latentcot.parallel import ParallelContext, init_distributed
from megatron_latentcot.training import checkpoint as ckpt
from megatron_latentcot.training.lr_schedule import learning_rate
from megatron_latentcot.training.metrics import MetricsLogger, format_line, peak_memory_gb
from megatron_latentcot.training.optimizer import Optimizer
from megatron_latentcot.training.pipeline import forward_backward


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    train_flops: float = 0.0
    skipped_iterations: int = 0


def _to_device(mb: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in mb.items()}


class Engine:
    """Model, optimizer and scheduler of one rank; runs iterations on given micro-batches."""

    def __init__(self, cfg: Config, ctx: ParallelContext, vocab: int):
        self.cfg, self.ctx, self.vocab = cfg, ctx, vocab
        torch.manual_seed(cfg.train.seed)
        self.model = LlamaStage(cfg, ctx, vocab)
        init_weights(self.model, cfg.model, cfg.train.seed)
        self.optimizer = Optimizer(self.model, cfg, ctx)
        self.scheduler = LatentStepScheduler(self.model, cfg)
        self.state = TrainState()

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, microbatches: list[dict], forward_only: bool) -> list[dict[str, float]]:
        def stage_forward(mb, x):
            with self._autocast():
                return self.scheduler.stage_forward(mb, x)

        mbs = [_to_device(mb, self.ctx.device) for mb in microbatches]
        return forward_backward(stage_forward, mbs, self.ctx, torch.float32,
                                self.optimizer.set_gradient_sync, forward_only=forward_only)

    def dp_mean(self, values: list[float]) -> float:
        """Mean over micro-batches and data-parallel ranks (meaningful on the last stage)."""
        t = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=self.ctx.device)
        if self.ctx.dp_size > 1 and self.ctx.is_last_stage:
            dist.all_reduce(t, group=self.ctx.dp_group)
        return (t[0] / t[1].clamp(min=1)).item()

    def train_step(self, microbatches: list[dict]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches of the global batch."""
        stats = self.run(microbatches, forward_only=False)
        lr = learning_rate(self.cfg.train, self.state.iteration)
        grad_norm, applied = self.optimizer.step(lr)
        metrics = self.reduce_stats(stats)
        tr = self.cfg.train
        self.state.iteration += 1
        self.state.consumed_samples += tr.global_batch_size
        self.state.consumed_tokens += tr.global_batch_size * self.cfg.data.seq_length
        self.state.train_flops += metrics["flops"]
        self.state.skipped_iterations += 0 if applied else 1
        return dict(metrics, lr=lr, grad_norm=grad_norm, skipped=float(not applied))

    def reduce_stats(self, stats: list[dict[str, float]]) -> dict[str, float]:
        """Micro-batch stats -> iteration metrics, identical on every rank.

        Means over micro-batches and DP ranks, except ``flops`` (summed: the iteration's
        total). Computed on the last stage, then broadcast over the pipeline.
        """
        keys = self.scheduler.stat_names()
        values = torch.zeros(len(keys) + 1, dtype=torch.float64, device=self.ctx.device)
        if stats and stats[0]:
            values[:-1] = torch.tensor([sum(s[k] for s in stats) for k in keys],
                                       dtype=torch.float64)
            values[-1] = len(stats)
            if self.ctx.dp_size > 1:
                dist.all_reduce(values, group=self.ctx.dp_group)
        if self.ctx.pp_size > 1:  # only the last stage has stats
            dist.broadcast(values, self.ctx.stage_rank(self.ctx.pp_size - 1),
                           group=self.ctx.pp_group)
        count = values[-1].clamp(min=1)
        return {k: (values[i] if k == "flops" else values[i] / count).item()
                for i, k in enumerate(keys)}

    @torch.no_grad()
    def eval_loss(self, microbatches: list[dict]) -> float:
        self.model.eval()
        losses = [s["lm_loss"] for s in self.run(microbatches, forward_only=True)]
        self.model.train()
        return self.dp_mean(losses) if self.ctx.is_last_stage else math.nan


class Trainer:
    def __init__(self, cfg: Config, ctx: ParallelContext | None = None):
        from megatron_latentcot.data.dataset import build_datasets
        from megatron_latentcot.data.tokenizer import build_tokenizer

        self.cfg = cfg
        self.ctx = ctx = ctx or init_distributed(cfg.parallel)
        tr, data = cfg.train, cfg.data
        if not data.data_path or not data.tokenizer_model:
            raise ConfigError("data.data_path and data.tokenizer_model are required for training")
        dp_batch = tr.micro_batch_size * ctx.dp_size
        if tr.global_batch_size % dp_batch:
            raise ConfigError(f"train.global_batch_size ({tr.global_batch_size}) must be a multiple "
                              f"of train.micro_batch_size x data-parallel size ({dp_batch})")
        self.num_micro = tr.global_batch_size // dp_batch
        self.tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model)
        vocab = padded_vocab_size(cfg.model, self.tokenizer.vocab_size, ctx.tp_size)
        self.engine = Engine(cfg, ctx, vocab)
        self.resumed_from: str | None = None
        if tr.load:
            self._load(tr.load)
        evals = (tr.train_iters // tr.eval_interval + 1) if tr.eval_interval else 1
        n_train = tr.train_iters * tr.global_batch_size
        n_eval = evals * tr.eval_iters * tr.global_batch_size

        def whole(paths: list[str], samples: int):  # every document of ``paths`` in one split
            one = dataclasses.replace(data, data_path=paths, split="1,0,0")
            return build_datasets(one, self.tokenizer, data.seq_length, (samples, 0, 0),
                                  tr.seed)[0]

        if data.valid_path:
            self.train_ds = whole(data.data_path, n_train)
            self.valid_ds = whole([data.valid_path], n_eval) if n_eval else None
        else:
            self.train_ds, self.valid_ds, _ = build_datasets(
                data, self.tokenizer, data.seq_length,
                (n_train, n_eval, tr.eval_iters * tr.global_batch_size), tr.seed)
        self.heldout_ds = (whole([data.heldout_path], tr.eval_iters * tr.global_batch_size)
                           if data.heldout_path and tr.eval_iters else None)
        log_dir = Path(tr.save) if tr.save else None
        self.log = MetricsLogger(cfg, ctx.is_logging_rank, log_dir)
        self.peak = peak_tflops(torch.cuda.get_device_name(ctx.device)
                                if ctx.device.type == "cuda" else "cpu", tr.peak_tflops)

    @property
    def state(self) -> TrainState:
        return self.engine.state

    def _next_microbatches(self, batch_iter) -> list[dict]:
        return [next(batch_iter) for _ in range(self.num_micro)]

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset, iters: int) -> float:
        """Mean LM loss over ``iters`` global batches from the start of ``dataset``."""
        from megatron_latentcot.data.dataset import micro_batches

        it = micro_batches(dataset, 0, self.cfg.train.micro_batch_size, self.ctx.dp_rank,
                           self.ctx.dp_size)
        return self.engine.eval_loss([mb for _ in range(iters) for mb in self._next_microbatches(it)])

    def _eval_and_log(self) -> dict[str, float]:
        tr, out = self.cfg.train, {}
        if tr.eval_iters == 0:
            return out
        for split, ds in (("valid", self.valid_ds), ("heldout", self.heldout_ds)):
            if ds is None or len(ds) == 0:
                continue
            loss = self.evaluate(ds, tr.eval_iters)
            out[f"{split}_loss"], out[f"{split}_ppl"] = loss, math.exp(min(loss, 50.0))
            self.log.log(self.state.iteration, {"loss": loss, "ppl": out[f"{split}_ppl"]}, split)
            self.log.print(f"  {split}: loss {loss:.4f} | perplexity {out[f'{split}_ppl']:.2f}")
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def save(self) -> Path:
        tr = self.cfg.train
        assert tr.save
        payload = {"model": self.engine.model.state_dict(),
                   "optimizer": self.engine.optimizer.optimizer.state_dict(),
                   "rng": ckpt.rng_state(), "state": dataclasses.asdict(self.state)}
        manifest = {"config": self.cfg.to_dict(), "tokenizer": self.tokenizer.fingerprint,
                    "consumed_tokens": self.state.consumed_tokens,
                    "train_flops": self.state.train_flops}
        path = ckpt.save_checkpoint(tr.save, self.state.iteration, payload, manifest, self.ctx,
                                    tr.keep_last, protect=self.resumed_from)
        self.log.print(f"  saved checkpoint {path}")
        return path

    def _load(self, load_dir: str) -> None:
        path = ckpt.latest_checkpoint(load_dir)
        if path is None:
            self.log_print_early(f"no checkpoint in {load_dir}: starting from scratch")
            return
        payload, manifest = ckpt.load_checkpoint(path, self.ctx)
        if manifest.get("tokenizer") != self.tokenizer.fingerprint:
            raise ckpt.CheckpointError(f"{path}: saved with a different tokenizer")
        ckpt.restore_model(self.engine.model, payload["model"])
        ckpt.restore_optimizer(self.engine.optimizer.optimizer, payload["optimizer"])
        ckpt.set_rng_state(payload["rng"])
        self.engine.state = TrainState(**payload["state"])
        self.resumed_from = path.name
        self.log_print_early(f"resumed from {path} at iteration {self.state.iteration}")

    def log_print_early(self, message: str) -> None:
        if self.ctx.is_logging_rank:
            print(message, flush=True)

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        from megatron_latentcot.data.dataset import micro_batches

        tr = self.cfg.train
        batch_iter = micro_batches(self.train_ds, self.state.consumed_samples,
                                   tr.micro_batch_size, self.ctx.dp_rank, self.ctx.dp_size)
        history: list[float] = []
        t0, window_flops, window_tokens = time.time(), 0.0, 0
        while self.state.iteration < tr.train_iters:
            step = self.engine.train_step(self._next_microbatches(batch_iter))
            history.append(step["lm_loss"])
            window_flops += step["flops"]
            window_tokens += tr.global_batch_size * self.cfg.data.seq_length
            it = self.state.iteration
            if it % tr.log_interval == 0 or it == tr.train_iters:
                dt = time.time() - t0
                n_iter = (it - 1) % tr.log_interval + 1
                tflops = window_flops / dt / 1e12 / self.ctx.world_size
                s = dict(step, consumed_tokens=self.state.consumed_tokens,
                         tokens_per_s=window_tokens / dt, tflops=tflops,
                         mfu=tflops / self.peak if self.peak else None,
                         peak_mem_gb=peak_memory_gb(self.ctx.device), s_per_iter=dt / n_iter,
                         train_flops=self.state.train_flops)
                self.log.print(format_line(it, tr.train_iters, s))
                self.log.log(it, {k: v for k, v in s.items() if v is not None})
                t0, window_flops, window_tokens = time.time(), 0.0, 0
            if tr.eval_interval and it % tr.eval_interval == 0 and it < tr.train_iters:
                self._eval_and_log()
            if tr.save and tr.save_interval and it % tr.save_interval == 0:
                self.save()
        final = self._eval_and_log()
        if tr.save:
            self.save()
        self.log.close()
        return {"losses": history, "iteration": self.state.iteration,
                "train_flops": self.state.train_flops, **final}
