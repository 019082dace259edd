"""The pretraining loop: data -> micro-batches -> pipeline forward/backward -> ZeRO step.

Reads top to bottom: ``Trainer.__init__`` builds everything, ``train`` iterates, logs,
evaluates and checkpoints. Every rank runs the same code; only the last pipeline stage sees
losses, and only the logging rank prints.

Faults (see ``faults.py`` for the exit codes): an iteration with a non-finite loss or gradient
skips its update, and ``train.max_skipped_in_a_row`` of them in a row stop the run; a loss spike
logs the iteration's samples; SIGTERM/SIGUSR1 save at the next iteration boundary and return
``exit_code = EXIT_REQUEUE``; a failed or timed-out collective raises ``CollectiveError`` naming
the rank and the phase; a failed save stops the run (or warns, if configured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_latentcot.config import Config, ConfigError
from megatron_latentcot.flops import peak_tflops
from megatron_latentcot.model.latent import LatentStepScheduler
from megatron_latentcot.model.llama import LlamaStage, init_weights
from megatron_latentcot.parallel import LaunchError, ParallelContext, init_distributed
from megatron_latentcot.training import checkpoint as ckpt
from megatron_latentcot.training import latent_pipeline
from megatron_latentcot.training.deepspeed_zero import DeepSpeedOptimizer, resume_refusal
from megatron_latentcot.training.faults import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REQUEUE,
    CollectiveGuard,
    PreemptionHandler,
    TrainingHalted,
)
from megatron_latentcot.training.lr_schedule import learning_rate
from megatron_latentcot.training.metrics import (
    MetricsLogger,
    ThroughputWindow,
    format_header,
    format_line,
    format_summary,
    mean_stats,
    sum_stats,
)
from megatron_latentcot.training.optimizer import Optimizer, no_weight_decay
from megatron_latentcot.training.pipeline import forward_backward
from megatron_latentcot.vocab import padded_vocab_size


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    train_flops: float = 0.0
    skipped_iterations: int = 0
    skipped_in_a_row: int = 0
    recent_losses: list[float] = dataclasses.field(default_factory=list)  # loss-spike window


def _to_device(mb: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in mb.items()}


class Engine:
    """Model, optimizer and scheduler of one rank; runs iterations on given micro-batches."""

    def __init__(self, cfg: Config, ctx: ParallelContext, vocab: int):
        self.cfg, self.ctx, self.vocab = cfg, ctx, vocab
        torch.manual_seed(cfg.train.seed)
        self.model = LlamaStage(cfg, ctx, vocab)
        init_weights(self.model, cfg.model, cfg.train.seed)
        self.optimizer = (DeepSpeedOptimizer(self.model, cfg, ctx) if cfg.parallel.zero == "deepspeed"
                          else Optimizer(self.model, cfg, ctx))
        self.scheduler = LatentStepScheduler(self.model, cfg)
        self.state = TrainState()
        coords = f" (tp {ctx.tp_rank}, pp {ctx.pp_rank}, dp {ctx.dp_rank})" if ctx.world_size > 1 else ""
        self.guard = CollectiveGuard(ctx.rank, ctx.world_size, cfg.parallel.timeout_minutes * 60,
                                     coords=coords)

    def _autocast(self):
        """bf16: torch autocast around every forward, the same on CPU and GPU. Master weights,
        gradients, optimizer state and checkpoints stay fp32; matmuls (the TP linears cast their
        own operands, ``llama._AutocastCast``) and attention run in bf16; the residual stream,
        routing, mixing and losses stay fp32. Under FSDP2 the gathers are bf16 too
        (``optimizer.mixed_precision``)."""
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, microbatches: list[dict], forward_only: bool) -> list[dict[str, float]]:
        def stage_forward(mb, x):
            with self._autocast():
                return self.scheduler.stage_forward(mb, x)

        mbs = [_to_device(mb, self.ctx.device) for mb in microbatches]
        self.optimizer.prefetch_params()  # FSDP2 all-gathers overlap the first forward
        schedule = self.cfg.parallel.pipeline_schedule
        if isinstance(self.optimizer, DeepSpeedOptimizer) and not forward_only:  # PP = 1
            return self.optimizer.forward_backward(stage_forward, mbs)
        if self.ctx.pp_size > 1 and self.scheduler.max_steps > 1:  # steps loop through stages
            return latent_pipeline.forward_backward(
                self.scheduler, mbs, self.ctx, torch.float32,
                forward_only=forward_only, autocast=self._autocast, schedule=schedule)
        return forward_backward(stage_forward, mbs, self.ctx, torch.float32,
                                forward_only=forward_only, schedule=schedule)

    def train_step(self, microbatches: list[dict]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches of the global batch.

        The update is skipped (gradients dropped, the iteration still counts and consumes its
        batch) when the loss or the gradient norm is not finite; every rank agrees, as both
        are reduced over all ranks first.
        """
        with self.guard.phase("forward/backward (pipeline send/recv, FSDP gather/scatter)"):
            stats = self.run(microbatches, forward_only=False)
        with self.guard.phase("loss all-reduce over data/pipeline ranks"):
            metrics = self.reduce_stats(stats)
        lr = learning_rate(self.cfg.train, self.state.iteration)
        losses = [metrics[k] for k in ("lm_loss", "adaptive_loss") if k in metrics]
        if all(math.isfinite(v) for v in losses):
            with self.guard.phase("optimizer step (gradient and grad-norm all-reduce)"):
                grad_norm, applied = self.optimizer.step(lr)
        else:
            self.optimizer.skip()
            grad_norm, applied = math.nan, False
        tr, st = self.cfg.train, self.state
        st.iteration += 1
        st.consumed_samples += tr.global_batch_size
        st.consumed_tokens += tr.global_batch_size * self.cfg.data.seq_length
        st.train_flops += metrics["flops"]
        st.skipped_iterations += 0 if applied else 1
        st.skipped_in_a_row = 0 if applied else st.skipped_in_a_row + 1
        return dict(metrics, lr=lr, grad_norm=grad_norm, skipped=float(not applied))

    def reduce_stats(self, stats: list[dict[str, float]]) -> dict[str, float]:
        """Micro-batch stats -> iteration metrics, identical on every rank.

        Means over micro-batches and DP ranks, except ``flops`` (summed: the iteration's
        total). Computed on the last stage, then broadcast over the pipeline.
        """
        keys = self.scheduler.stat_names()
        values = sum_stats(stats, keys, self.ctx.device)  # device-side: no sync yet
        if stats and stats[0]:
            if self.ctx.dp_size > 1:
                dist.all_reduce(values, group=self.ctx.dp_group)
        if self.ctx.pp_size > 1:  # only the last stage has stats
            dist.broadcast(values, self.ctx.stage_rank(self.ctx.pp_size - 1),
                           group=self.ctx.pp_group)
        return mean_stats(values, keys, summed=("flops",))  # the iteration's one host sync

    @torch.no_grad()
    def eval_loss(self, microbatches: list[dict]) -> float:
        """Mean LM loss over micro-batches and DP ranks, on every rank: only the last stage
        computes losses, so it goes through :meth:`reduce_stats` like training's."""
        self.model.eval()
        stats = self.run(microbatches, forward_only=True)
        self.model.train()
        return self.reduce_stats(stats)["lm_loss"]


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
        self.preempt = PreemptionHandler()
        self.resumed_from: str | None = None
        self.last_saved: int | None = None  # iteration of the newest checkpoint of this run
        self.save_attempted: int | None = None  # iteration of the last save tried
        self.lock: ckpt.RunLock | None = None
        try:  # (a lock still held when the process ends is released at exit)
            load = self._check_output_dir()
            if load:
                with self.engine.guard.phase("checkpoint load"):
                    self._load(load)
            elif tr.init_from:  # a new run from pretrained weights (training/init_from.py)
                with self.engine.guard.phase("train.init_from load"):
                    self._init_from(tr.init_from)
                    self.engine.optimizer.weights_loaded()
        except BaseException:
            self._release()
            raise
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
        self.log = MetricsLogger(cfg, ctx.is_logging_rank, log_dir, self.state.iteration)
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
            tokens = tr.eval_iters * tr.global_batch_size * self.cfg.data.seq_length
            self.log.print(f"  {split}: loss {loss:.4f} | perplexity {out[f'{split}_ppl']:.2f} "
                           f"({tokens:,} sampled tokens)")
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def save(self) -> Path | None:
        """Save (collective). A failure raises, or warns when ``continue_on_save_error``."""
        tr = self.cfg.train
        assert tr.save
        self.save_attempted = self.state.iteration
        payload = {"model": self.engine.model.state_dict(),
                   "optimizer": self.engine.optimizer.state_dict(),
                   "rng": ckpt.rng_state(), "state": dataclasses.asdict(self.state)}
        manifest = {"config": self.cfg.to_dict(), "tokenizer": self.tokenizer.fingerprint,
                    "vocab_size": self.engine.vocab, "consumed_tokens": self.state.consumed_tokens,
                    "train_flops": self.state.train_flops}
        try:
            with self.engine.guard.phase("checkpoint save"):
                path = ckpt.save_checkpoint(tr.save, self.state.iteration, payload, manifest,
                                            self.ctx, tr.keep_last, protect=self.resumed_from)
        except ckpt.CheckpointError as e:
            msg = (f"checkpoint at iteration {self.state.iteration} failed: {e} (last good "
                   f"checkpoint: {self._last_good()})")
            if not tr.continue_on_save_error:
                raise ckpt.CheckpointError(f"{msg}. Training stopped; set "
                                           "train.continue_on_save_error=true to go on unsaved") from e
            self.warn(f"WARNING: {msg}; training continues UNSAVED "
                      "(train.continue_on_save_error=true)")
            return None
        self.last_saved = self.state.iteration
        self.log.print(f"  saved checkpoint {path}")
        return path

    def _last_good(self) -> str:
        return f"iter_{self.last_saved:07d}" if self.last_saved is not None else "none"

    def _check_output_dir(self) -> str | None:
        """Lock ``train.save`` and decide where to resume from (collective); returns the
        directory to load, or None to start from scratch.

        ``train.save`` must be writable and used by one run at a time (``checkpoint.RunLock``).
        Checkpoints already in it are never lost without asking: those of a run with the same
        config are resumed (also when ``train.load`` names another directory: a rerun or a
        requeue of the same command goes on where it stopped), those of another config are
        refused, and ``train.overwrite`` deletes them and starts from scratch.
        """
        tr = self.cfg.train
        if not tr.save:
            return tr.load
        save = Path(tr.save)
        loads_save = bool(tr.load) and Path(tr.load).resolve() == save.resolve()
        if tr.overwrite and loads_save:
            raise ConfigError(f"train.overwrite=true and train.load=train.save ({tr.save}) "
                              "contradict each other: overwrite starts from scratch")
        error = None
        try:
            probe = save / f".write_probe.{self.ctx.rank}"
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            error = f"train.save={tr.save} is not writable ({e})"
        try:
            ckpt.agree(self.ctx, error)
        except ckpt.CheckpointError as e:
            if not tr.continue_on_save_error:
                raise
            self.warn(f"WARNING: {e}; training anyway (train.continue_on_save_error=true)")
            return tr.load
        self._lock()
        found = ckpt.list_checkpoints(save)
        if tr.overwrite:
            error = None
            if self.ctx.rank == 0:
                try:
                    ckpt.remove_checkpoints(save)
                    (save / "metrics.jsonl").unlink(missing_ok=True)
                except OSError as e:
                    error = f"train.overwrite=true: cannot delete the checkpoints in {save} ({e})"
            ckpt.agree(self.ctx, error)
            if found:
                self.warn(f"WARNING: train.overwrite=true: deleted the {len(found)} checkpoint(s) "
                          f"in train.save={tr.save} (newest {found[-1].name}); starting from "
                          + (f"train.load={tr.load}" if tr.load else "scratch"))
            return tr.load
        if loads_save or not found:
            return tr.load
        try:
            saved = ckpt.saved_config(ckpt.read_manifest(found[-1]))
        except ckpt.CheckpointError:
            saved = {}
        diff = ckpt.config_diff(saved, self.cfg.to_dict(),
                                ignore=("train.load", "train.save", "train.overwrite"))
        if diff:
            raise LaunchError(
                f"train.save={tr.save} holds checkpoints of another run ({found[-1].name}, "
                f"config differs: {'; '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}). Set "
                f"train.load={tr.save} to resume that run on purpose, train.overwrite=true to "
                "delete its checkpoints and start from scratch, or choose another train.save")
        self.log_print_early(
            f"train.save={tr.save} holds checkpoints of this run (same config, newest "
            f"{found[-1].name}): resuming from them" + (f", not from train.load={tr.load}"
                                                        if tr.load else "")
            + " (train.overwrite=true starts from scratch)")
        return tr.save

    def _lock(self) -> None:
        """Rank 0 takes ``train.save``'s RunLock; every rank raises LaunchError if it is held."""
        error = None
        if self.ctx.rank == 0:
            lock = ckpt.RunLock(self.cfg.train.save)
            try:
                lock.acquire(lambda msg: print(f"WARNING: {msg}", file=sys.stderr, flush=True))
                self.lock = lock
            except (ckpt.CheckpointError, OSError) as e:
                error = f"train.save={self.cfg.train.save}: {e}"
        if self.ctx.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise LaunchError(error)

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _load(self, load_dir: str) -> None:
        """Restore everything from ``load_dir``'s latest checkpoint; all ranks fail together.

        A checkpoint of another parallel layout (TP, PP or DP size, FSDP2 sharding, pipeline
        split) is re-sliced for this one (``reshard.py``): weights, AdamW states, iteration,
        data position and LR schedule are restored exactly. RNG states are per rank and do not
        carry over to another layout: every RNG is then reseeded from ``train.seed`` and the
        iteration, and the log says so.
        """
        from megatron_latentcot.training import reshard

        error, path, payload, files = None, None, None, None
        try:
            path = ckpt.latest_checkpoint(load_dir)
            if path is not None:
                manifest = ckpt.read_manifest(path)
                self._check_compatible(path, manifest)
                files = reshard.RankFiles(path, manifest)
                refusal = resume_refusal(manifest.get("config", {}), self.cfg,
                                         self._same_layout(manifest, files))
                if refusal:
                    raise ckpt.CheckpointError(f"{path}: {refusal}")
                if self._same_layout(manifest, files):
                    payload, _ = ckpt.load_checkpoint(path, self.ctx)
                else:  # every rank checksums its share of the files; all read them after
                    mine = files.ranks[self.ctx.rank::self.ctx.world_size]
                    error = "; ".join(files.verify(mine)) or None
        except ckpt.CheckpointError as e:
            error = str(e)
        ckpt.agree(self.ctx, error)
        if path is None:
            self.log_print_early(f"no checkpoint in {load_dir}: starting from scratch")
            return
        assert files is not None
        saved, now = files.layout, ckpt.layout(self.ctx)
        if payload is None:
            opt = self.engine.optimizer
            decay_all = bool(files.manifest["config"].get("train", {}).get(
                "decay_norms_and_embeddings", False))
            error = None
            try:
                payload = reshard.resliced_payload(
                    files, self.ctx, self.engine.model, opt.optimizer, opt.layouts,
                    no_decay=lambda name: no_weight_decay(name, decay_all))
            except ckpt.CheckpointError as e:
                error = (f"{path}: cannot re-slice it from tp={saved['tp']} pp={saved['pp']} "
                         f"dp={saved['dp']} to tp={now['tp']} pp={now['pp']} dp={now['dp']}: {e}")
            ckpt.agree(self.ctx, error)
        assert payload is not None
        error = None
        try:  # a rank that cannot take its share must not leave the others waiting
            ckpt.restore_model(self.engine.model, payload["model"])
            self.engine.optimizer.load_state_dict(payload["optimizer"])
            self.engine.state = TrainState(**payload["state"])
        except ckpt.CheckpointError as e:
            error = f"{path}: {e}"
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            error = f"{path}: this rank's payload does not fit the model/optimizer: {e!r}"
        ckpt.agree(self.ctx, error)
        it = self.state.iteration
        if "rng" in payload:
            ckpt.set_rng_state(payload["rng"])
            how = ""
        elif saved == now:  # re-sliced for another FSDP2 sharding or pipeline split only
            ckpt.set_rng_state(files.payload(self.ctx.rank)["rng"])
            how = (", re-sliced for this run's FSDP2 sharding / pipeline split (weights and "
                   "AdamW states exact)")
        else:
            seed = ckpt.reseed(self.cfg.train.seed, it)
            how = (f", re-sliced from tp={saved['tp']} pp={saved['pp']} dp={saved['dp']} to "
                   f"tp={now['tp']} pp={now['pp']} dp={now['dp']} (weights and AdamW states "
                   f"exact); RNG states NOT restored (they are per rank): python/numpy/torch "
                   f"reseeded with {seed} from train.seed={self.cfg.train.seed} and the iteration")
        self.resumed_from = path.name
        self.last_saved = self.save_attempted = it
        self.log_print_early(f"resumed from {path} at iteration {it}{how}")

    def _init_from(self, source: str) -> None:
        """Weights from ``train.init_from``; everything else starts fresh. All ranks fail
        together, with one line naming the file or field."""
        from megatron_latentcot.data.tokenizer import TokenizerError
        from megatron_latentcot.training import init_from

        error = message = failure = None
        try:
            message = init_from.initialize(source, self.cfg, self.ctx, self.engine.model,
                                           self.engine.optimizer.layouts, self.engine.vocab,
                                           self.tokenizer.fingerprint)
        except (ckpt.CheckpointError, TokenizerError) as e:
            error = str(e)
        except Exception as e:  # anything else (a bug, memory): the other ranks must not wait
            error, failure = f"{type(e).__name__}: {e}", e
        try:
            ckpt.agree(self.ctx, error)
        except ckpt.CheckpointError:
            if failure is not None:  # this rank's own traceback, not a one-line input error
                raise failure from None
            raise
        self.log_print_early(str(message))

    def _same_layout(self, manifest: dict[str, Any], files: Any) -> bool:
        """Whether this rank's own file fits as it is (else the checkpoint is re-sliced)."""
        saved = manifest.get("config", {}).get("parallel", {})
        return (manifest.get("layout") == ckpt.layout(self.ctx)
                and files.dp_sharded == self.engine.optimizer.sharded
                and (self.ctx.pp_size == 1
                     or saved.get("pipeline_layers") == self.cfg.parallel.pipeline_layers))

    def _check_compatible(self, path: Path, manifest: dict[str, Any]) -> None:
        """The same tokenizer, model shape (vocabulary rows included) and method."""
        if manifest.get("tokenizer") != self.tokenizer.fingerprint:
            raise ckpt.CheckpointError(f"{path}: saved with a different tokenizer")
        saved, now = ckpt.saved_config(manifest), self.cfg.to_dict()
        padding = ("model.vocab_size", "model.make_vocab_size_divisible_by")  # compared as rows
        diff = ckpt.config_diff(saved, now, sections=("model",), ignore=padding) + [
            d for d in ckpt.config_diff(saved, now, sections=("latent",))
            if d.startswith("latent.method:")]
        rows = manifest.get("vocab_size")
        if rows is None:  # saved before manifests recorded it: pad as that run did
            m, tp = saved.get("model", {}), (manifest.get("layout") or {}).get("tp", 1)
            rows = padded_vocab_size(dataclasses.replace(
                self.cfg.model, vocab_size=m.get("vocab_size"),
                make_vocab_size_divisible_by=m.get("make_vocab_size_divisible_by", 128)),
                self.tokenizer.vocab_size, tp)
        if rows != self.engine.vocab:
            hint = (f", set model.vocab_size={rows} to keep the checkpoint's padding"
                    if rows >= self.tokenizer.vocab_size and rows % self.ctx.tp_size == 0 else "")
            diff.append(f"embedding rows (padded vocabulary): {rows} -> {self.engine.vocab}{hint}")
        if diff:
            raise ckpt.CheckpointError(f"{path}: saved with a different model ({'; '.join(diff)}); "
                                       "resume with the checkpoint's model settings")

    def log_print_early(self, message: str) -> None:
        if self.ctx.is_logging_rank:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.ctx.is_logging_rank:
            print(message, file=sys.stderr, flush=True)

    # -- numeric guards ---------------------------------------------------------------------
    def _on_skipped(self, step: dict[str, float], samples: tuple[int, int]) -> None:
        st, tr = self.state, self.cfg.train
        it, n = st.iteration, st.skipped_in_a_row
        what = "loss" if not math.isfinite(step["lm_loss"]) else "gradient norm"
        self.warn(f"WARNING: iter {it}: non-finite {what} (loss {step['lm_loss']}, grad norm "
                  f"{step['grad_norm']}): update skipped ({n} in a row, {st.skipped_iterations} "
                  f"in total); batch = train samples [{samples[0]}, {samples[1]})")
        self.log.log(it, {"loss": step["lm_loss"], "grad_norm": step["grad_norm"], "in_a_row": n,
                          "first_sample": samples[0], "end_sample": samples[1]}, "skipped")
        if tr.max_skipped_in_a_row and n >= tr.max_skipped_in_a_row:
            raise TrainingHalted(
                f"stopping at iteration {it}: {n} iterations in a row ({it - n + 1}..{it}) had a "
                f"non-finite loss or gradient (train.max_skipped_in_a_row = "
                f"{tr.max_skipped_in_a_row}); their updates were skipped. Resume from an earlier "
                "checkpoint with a lower train.lr, or inspect the data")

    def _check_spike(self, loss: float, samples: tuple[int, int]) -> None:
        st, tr = self.state, self.cfg.train
        window = st.recent_losses
        if tr.loss_spike_factor and len(window) >= min(tr.loss_spike_window, 5):
            mean = sum(window) / len(window)
            if loss > tr.loss_spike_factor * mean:
                self.warn(f"WARNING: iter {st.iteration}: loss spike {loss:.4f} > "
                          f"{tr.loss_spike_factor:g} x running mean {mean:.4f}; batch = train "
                          f"samples [{samples[0]}, {samples[1]})")
                self.log.log(st.iteration, {"loss": loss, "running_mean": mean,
                                            "first_sample": samples[0], "end_sample": samples[1]},
                             "loss_spike")
        window.append(loss)
        del window[:-tr.loss_spike_window]

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train to ``train.train_iters`` (or a preemption signal). Collective.

        A resumed run that already reached ``train.train_iters`` says so and returns at once
        (nothing is evaluated, logged or saved again).
        """
        tr, it = self.cfg.train, self.state.iteration
        if self.resumed_from is not None and it >= tr.train_iters:
            self.log.print(f"already complete: {self.resumed_from} is iteration {it} of "
                           f"train.train_iters={tr.train_iters}, nothing to train (raise "
                           "train.train_iters to train on, or set train.overwrite=true to start "
                           "again)")
            self._release()
            self.log.close()
            return {"losses": [], "iteration": it, "train_flops": self.state.train_flops,
                    "exit_code": EXIT_OK, "skipped_iterations": self.state.skipped_iterations,
                    "already_complete": True}
        self.preempt.install()
        self.engine.guard.start()
        try:
            return self._train()
        finally:
            self.engine.guard.stop()
            self.preempt.restore()
            self.log.close()
            self._release()

    def _print_header(self) -> None:
        """The start block (see ``format_header``): parameters counted as the planner does."""
        from megatron_latentcot.plan import non_embedding_params, total_params

        ctx, vocab = self.ctx, self.engine.vocab
        params = (total_params(self.cfg, vocab), non_embedding_params(self.cfg, vocab))
        self.log.print(format_header(self.cfg, params,
                                     (ctx.tp_size, ctx.pp_size, ctx.dp_size), ctx.device.type,
                                     self.state.iteration))

    def _train(self) -> dict[str, Any]:
        from megatron_latentcot.data.dataset import micro_batches
        from megatron_latentcot.data.prefetch import Prefetcher, pin_batches

        tr = self.cfg.train
        batch_iter = micro_batches(self.train_ds, self.state.consumed_samples,
                                   tr.micro_batch_size, self.ctx.dp_rank, self.ctx.dp_size)
        # The next iteration's micro-batches are read while this one trains (same order).
        batches = Prefetcher(lambda: self._next_microbatches(batch_iter),
                             transform=pin_batches if self.ctx.device.type == "cuda" else None)
        try:
            return self._iterate(batches)
        finally:
            batches.close()

    def _iterate(self, batches: Any) -> dict[str, Any]:
        """The training iterations from ``batches`` (lists of micro-batches), then the final
        evaluation and save. Throughput is measured over the iterations only."""
        tr, guard = self.cfg.train, self.engine.guard
        history: list[float] = []
        self._print_header()
        start_it, start_time = self.state.iteration, time.time()
        window = ThroughputWindow(self.ctx.device)
        while self.state.iteration < tr.train_iters:
            window.begin()
            step = self.engine.train_step(next(batches))
            window.end(step["flops"], tr.global_batch_size * self.cfg.data.seq_length)
            history.append(step["lm_loss"])
            it = self.state.iteration
            samples = (self.state.consumed_samples - tr.global_batch_size,
                       self.state.consumed_samples)
            if step["skipped"]:
                self._on_skipped(step, samples)
            else:
                self._check_spike(step["lm_loss"], samples)
            if it % tr.log_interval == 0 or it == tr.train_iters:
                s = dict(step, consumed_tokens=self.state.consumed_tokens,
                         **window.report(self.ctx.world_size, self.peak),
                         train_flops=self.state.train_flops, elapsed_s=time.time() - start_time)
                s["eta_s"] = s["elapsed_s"] / (it - start_it) * (tr.train_iters - it)
                self.log.print(format_line(it, tr.train_iters, s))
                self.log.log(it, {k: v for k, v in s.items() if v is not None})
            with guard.phase("preemption-flag all-reduce"):
                signum = self.preempt.requested(self.ctx.world_size, self.ctx.device)
            if signum:
                return self._preempted(signum, history)
            if tr.eval_interval and it % tr.eval_interval == 0 and it < tr.train_iters:
                with guard.phase("evaluation"):
                    self._eval_and_log()
            if tr.save and tr.save_interval and it % tr.save_interval == 0:
                self.save()
        with guard.phase("evaluation"):
            final = self._eval_and_log()
        if tr.save and self.save_attempted != self.state.iteration:
            self.save()
        code = EXIT_OK
        if tr.save and self.last_saved != self.state.iteration:  # continue_on_save_error
            code = EXIT_FAILURE
            self.warn(f"ERROR: training reached iteration {self.state.iteration} but its final "
                      f"checkpoint was not saved (train.continue_on_save_error=true); last good "
                      f"checkpoint: {self._last_good()}. Exiting with code {code}")
        last = f"{tr.save}/iter_{self.last_saved:07d}" if self.last_saved is not None else None
        self.log.print(format_summary(self.cfg, self.state.iteration - start_it,
                                      time.time() - start_time, last, final))
        return {"losses": history, "iteration": self.state.iteration,
                "train_flops": self.state.train_flops, "exit_code": code,
                "skipped_iterations": self.state.skipped_iterations, **final}

    def _preempted(self, signum: int, history: list[float]) -> dict[str, Any]:
        """Save at this boundary (unless just saved) and report ``EXIT_REQUEUE``."""
        tr, it = self.cfg.train, self.state.iteration
        name = signal.Signals(signum).name
        saved = bool(tr.save) and (self.last_saved == it or (
            self.save_attempted != it and self.save() is not None))
        code = EXIT_REQUEUE if saved else 128 + signum
        self.log.print(f"preempted by {name} at iteration {it}: "
                       f"{f'checkpoint iter_{it:07d} saved' if saved else 'NOTHING SAVED'}; "
                       f"exiting with code {code}" + (" (requeue)" if saved else ""))
        return {"losses": history, "iteration": it, "train_flops": self.state.train_flops,
                "exit_code": code, "preempted": name,
                "skipped_iterations": self.state.skipped_iterations}
