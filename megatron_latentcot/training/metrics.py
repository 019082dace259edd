"""Console progress, TensorBoard, JSONL and (optional, offline by default) wandb logging.

Only the logging rank (first rank of the last pipeline stage, which sees the loss) writes.
A log that cannot be written (unwritable directory, full disk) warns once and is dropped:
losing metrics must not stop training; checkpoint failures are handled separately.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megatron_latentcot.config import Config


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    def __init__(self, cfg: Config, enabled: bool, log_dir: Path | None):
        self.enabled = enabled
        self.tb = self.wandb = self.jsonl = None
        if not enabled:
            return
        tb_dir = cfg.train.tensorboard_dir or (str(log_dir / "tensorboard") if log_dir else None)
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.tb = SummaryWriter(tb_dir)
            except OSError as e:
                self._drop("tb", f"TensorBoard logging to {tb_dir}", e)
        if log_dir is not None:
            try:
                log_dir.mkdir(parents=True, exist_ok=True)
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


def format_line(it: int, total: int, s: dict[str, Any]) -> str:
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
    return line
