"""Learning rate: linear warmup, then cosine / linear decay to ``min_lr`` (or constant)."""

from __future__ import annotations

import math

from megatron_latentcot.config import TrainConfig


def learning_rate(cfg: TrainConfig, iteration: int) -> float:
    """LR for the update that ends iteration ``iteration`` (0-based)."""
    step = iteration + 1
    if cfg.lr_warmup_iters and step <= cfg.lr_warmup_iters:
        return cfg.lr * step / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_iters = (cfg.lr_decay_iters or cfg.train_iters) - cfg.lr_warmup_iters
    progress = min(1.0, (step - cfg.lr_warmup_iters) / max(1, decay_iters))
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
