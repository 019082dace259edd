"""Console progress, TensorBoard, JSONL and (optional, offline by default) wandb logging.

Only the logging rank (first rank of the last pipeline stage, which sees the loss) writes.
A log that cannot be written (unwritable directory, full disk) warns once and is dropped:
losing metrics must not stop training; checkpoint failures are handled separately.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_latentcot.config import Config


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: peak allocated since the last ``reset_peak_memory``; CPU: the process's peak RSS
    (it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class ThroughputWindow:
    """Tokens/s, TFLOP/s, MFU and peak memory over the training iterations since the last
    report, and nothing else: the time and memory of what runs between iterations (evaluation,
    checkpoint saves, logging) are not counted, so a save does not show up as a slow window.

    Wrap each iteration (data fetch included) in ``begin()``/``end()``; ``report()`` closes
    the window. On CUDA, ``end()`` synchronises so the iteration's kernels are in its time.
    """

    def __init__(self, device: torch.device, clock: Callable[[], float] | None = None):
        self.device, self.clock = device, clock or time.perf_counter
        self._reset()

    def _reset(self) -> None:
        self.seconds, self.flops, self.tokens, self.iterations = 0.0, 0.0, 0, 0
        self.peak_gb, self._started = 0.0, None

    def begin(self) -> None:
        reset_peak_memory(self.device)  # what ran since the last iteration is not ours
        self._started = self.clock()

    def end(self, flops: float, tokens: int) -> None:
        if self._started is None:
            raise RuntimeError("ThroughputWindow.end() without begin()")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += self.clock() - self._started
        self.flops += flops
        self.tokens += tokens
        self.iterations += 1
        self.peak_gb = max(self.peak_gb, peak_memory_gb(self.device))
        self._started = None

    def report(self, world_size: int, peak_tflops: float | None) -> dict[str, float | None]:
        """The window's figures (per device for TFLOP/s and MFU); starts the next window."""
        if not self.iterations:
            raise RuntimeError("ThroughputWindow.report() with no iteration in the window")
        dt = max(self.seconds, 1e-9)
        tflops = self.flops / dt / 1e12 / world_size
        out = {"tokens_per_s": self.tokens / dt, "tflops": tflops,
               "mfu": tflops / peak_tflops if peak_tflops else None,
               "s_per_iter": self.seconds / self.iterations, "peak_mem_gb": self.peak_gb,
               "window_iters": float(self.iterations)}
        self._reset()
        return out


class MetricsLogger:
    def __init__(self, cfg: Config, enabled: bool, log_dir: Path | None, iteration: int = 0):
        """``iteration``: where this run starts. What an earlier attempt logged after it (the
        iterations a resumed run does again) is dropped, from ``metrics.jsonl`` and from
        TensorBoard's view, so that each iteration is logged once."""
        self.enabled = enabled
        self.tb = self.wandb = self.jsonl = None
        if not enabled:
            return
        tb_dir = output_paths(cfg).get("tensorboard")
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.tb = SummaryWriter(tb_dir, purge_step=iteration + 1)
            except OSError as e:
                self._drop("tb", f"TensorBoard logging to {tb_dir}", e)
        if log_dir is not None:
            try:
                log_dir.mkdir(parents=True, exist_ok=True)
                keep_rows_until(log_dir / "metrics.jsonl", iteration)
                self.jsonl = open(log_dir / "metrics.jsonl", "a")  # noqa: SIM115
            except OSError as e:
                self._drop("jsonl", f"{log_dir / 'metrics.jsonl'}", e)
        if cfg.train.wandb_project and cfg.train.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                print("wandb is not installed: logging to TensorBoard only", file=sys.stderr)
            else:
                os.environ.setdefault("WANDB_MODE", cfg.train.wandb_mode)
                self.wandb = wandb.init(project=cfg.train.wandb_project, config=cfg.to_dict(),
                                        dir=str(log_dir) if log_dir else None)

    def log(self, iteration: int, scalars: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{split}/{k}", v, iteration)
        if self.jsonl is not None:
            try:
                self.jsonl.write(json.dumps({"split": split, "iteration": iteration,
                                             "time": time.time(), **scalars}) + "\n")
                self.jsonl.flush()
            except OSError as e:
                self._drop("jsonl", "metrics.jsonl", e)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in scalars.items()}, step=iteration)

    def _drop(self, attr: str, what: str, error: OSError) -> None:
        print(f"WARNING: cannot write {what} ({error}); continuing without it", file=sys.stderr,
              flush=True)
        handle = getattr(self, attr)
        setattr(self, attr, None)
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto ``device`` without a host sync (CUDA: a pinned, non-blocking copy;
    a pageable one would synchronize the stream)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def sum_stats(stats: list[dict[str, torch.Tensor | float]], keys: list[str],
              device: torch.device) -> torch.Tensor:
    """Per-key sums over micro-batches plus their count: float64 ``[len(keys) + 1]`` on
    ``device``, with no host sync: device scalars are added on the device, host floats in
    Python, each in micro-batch order from 0 (as ``sum`` does), so the sums are bit-identical
    to summing the values read back one by one."""
    if not stats or not stats[0]:  # a stage without the loss: no stats, count 0
        return _to_device(torch.zeros(len(keys) + 1, dtype=torch.float64), device)
    on_device = [k for k in keys if isinstance(stats[0][k], torch.Tensor)]
    host = _to_device(torch.tensor([0.0 if k in on_device else sum(s[k] for s in stats)
                                    for k in keys] + [len(stats)], dtype=torch.float64), device)
    if not on_device:
        return host
    acc = torch.zeros(len(on_device), dtype=torch.float64, device=device)  # sum()'s start
    for s in stats:
        acc = acc + torch.stack([torch.as_tensor(s[k], device=device).double()
                                 for k in on_device])
    slot = {k: j for j, k in enumerate(on_device)}
    return torch.stack([acc[slot[k]] if k in slot else host[i] for i, k in enumerate(keys)]
                       + [host[-1]])


def mean_stats(values: torch.Tensor, keys: list[str], summed: tuple[str, ...] = ("flops",)
               ) -> dict[str, float]:
    """:func:`sum_stats`' vector (reduced over ranks) -> per-key means over micro-batches
    (``summed`` keys stay totals), read back to the host in one sync."""
    totals, means = torch.stack([values[:-1], values[:-1] / values[-1].clamp(min=1)]).tolist()
    return {k: totals[i] if k in summed else means[i] for i, k in enumerate(keys)}


def keep_rows_until(path: Path, iteration: int) -> None:
    """Rewrite ``path`` (atomically) without its rows past ``iteration`` and without lines cut
    by a kill; untouched when there is nothing to drop."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int) \
                and row["iteration"] <= iteration:
            kept.append(line)
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)


def hms(seconds: float) -> str:
    """``H:MM:SS``: elapsed times and ETAs in the console."""
    t = max(0, round(seconds))
    return f"{t // 3600}:{t % 3600 // 60:02d}:{t % 60:02d}"


def output_paths(cfg: Config) -> dict[str, str]:
    """What a run writes where (the start block, the summary and ``MetricsLogger`` agree)."""
    tr, out = cfg.train, {}
    if tr.save:
        out["checkpoints"] = tr.save
        out["metrics"] = str(Path(tr.save) / "metrics.jsonl")
    tb = tr.tensorboard_dir or (str(Path(tr.save) / "tensorboard") if tr.save else None)
    if tb:
        out["tensorboard"] = tb
    return out


def format_header(cfg: Config, params: tuple[int, int], layout: tuple[int, int, int],
                  device: str, start_iteration: int) -> str:
    """The block printed before the first iteration: what trains, how, for how long, and where
    its outputs go, so a user can check the run before waiting for it. ``params``: (all,
    without embeddings)."""
    m, tr, lat = cfg.model, cfg.train, cfg.latent
    tp, pp, dp = layout
    tokens = tr.global_batch_size * cfg.data.seq_length
    steps = f", max_steps {lat.max_steps}" if lat.method != "vanilla" else ""
    lines = [f"== pretraining: {lat.method}{steps} Llama, {params[0]:,} parameters "
             f"({params[1]:,} without embeddings; hidden {m.hidden_size}, {m.num_layers} layers)",
             f"   layout      TP{tp} x PP{pp} x DP{dp} = {tp * pp * dp} process(es) on {device}, "
             f"{tr.precision}",
             f"   batch       {tr.global_batch_size} x {cfg.data.seq_length} = {tokens:,} tokens per "
             f"iteration; {tr.train_iters} iterations = {tokens * tr.train_iters:,} tokens"]
    if start_iteration:
        lines.append(f"   resumed     at iteration {start_iteration}")
    paths = output_paths(cfg)
    if not paths:
        lines.append("   outputs     none (train.save is not set: nothing is saved)")
    for name, path in paths.items():
        lines.append(f"   {name:<11s} {path}")
    return "\n".join(lines)


def format_summary(cfg: Config, iterations: int, seconds: float, checkpoint: str | None,
                   results: dict[str, float]) -> str:
    """The block printed at the end: how it went, where everything is, and what to run next."""
    tr = cfg.train
    tokens = tr.eval_iters * tr.global_batch_size * cfg.data.seq_length
    lines = [f"== done: {iterations} iterations in {hms(seconds)}"]
    for split in ("valid", "heldout"):
        if f"{split}_ppl" in results:
            lines.append(f"   {split:<11s} perplexity {results[f'{split}_ppl']:.2f} "
                         f"({tokens:,} sampled tokens)")
    lines.append(f"   checkpoint  {checkpoint or 'none saved'}")
    lines += [f"   {name:<11s} {path}" for name, path in output_paths(cfg).items()
              if name != "checkpoints"]
    if checkpoint:
        run = shlex.quote(tr.save)
        lines += [f"   next        python tools/generate.py {run} --prompt \"The\" --max-new-tokens 40",
                  f"               python tools/evaluate.py {run} --max-tokens 65536   "
                  "# the first 65,536 tokens of each set, as the README's table"]
    return "\n".join(lines)


def format_line(it: int, total: int, s: dict[str, Any]) -> str:
    """One log line; ``elapsed_s``/``eta_s`` (this process's time, the rest at its mean pace)
    end it when given."""
    mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a"
    line = (f"iter {it:>6d}/{total} | tokens {int(s['consumed_tokens']):>10d} | "
            f"loss {s['lm_loss']:.4f} | lr {s['lr']:.3e} | grad_norm {s['grad_norm']:.3f} | "
            f"tok/s {s['tokens_per_s']:,.0f} | TFLOP/s/dev {s['tflops']:.3f} | MFU {mfu} | "
            f"mem {s['peak_mem_gb']:.2f} GB | {s['s_per_iter']:.2f} s/it")
    fracs = [s[k] for k in sorted(s) if k.startswith("active_frac_step")]
    if len(fracs) > 1:
        line += f" | steps {s['mean_steps']:.2f} | active " + "/".join(f"{f:.2f}" for f in fracs)
    if "adaptive_loss" in s:
        line += f" | L_adapt {s['adaptive_loss']:.4f} | gate {s['gate_mean']:.2f}±{s['gate_std']:.2f}"
    if "elapsed_s" in s:
        line += f" | {100 * it / total:.0f}% | elapsed {hms(s['elapsed_s'])} | ETA {hms(s['eta_s'])}"
    return line
