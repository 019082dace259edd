"""The step scheduler: runs a micro-batch through a pipeline stage for the configured method.

This first version runs the token pass only (method ``vanilla``); the latent steps, router,
pruning and compaction build on the same stage pieces (embed, run_layers, final_norm, logits).
"""

from __future__ import annotations

import torch

from megatron_latentcot.config import Config
from megatron_latentcot.loss import masked_mean, token_cross_entropy
from megatron_latentcot.model.attention import causal_plan
from megatron_latentcot.model.llama import LlamaStage


class LatentStepScheduler:
    def __init__(self, stage: LlamaStage, cfg: Config):
        self.stage, self.cfg = stage, cfg
        if cfg.latent.method != "vanilla":
            raise NotImplementedError(f"latent.method={cfg.latent.method!r} is not built yet")

    def stage_forward(self, mb: dict, x: torch.Tensor | None):
        """One stage's pass of micro-batch ``mb``; returns (output or loss, stats)."""
        stage = self.stage
        tokens = mb["tokens"]
        rows, seq = tokens.shape
        positions = torch.arange(seq, device=tokens.device).repeat(rows)
        plan = causal_plan(rows, seq, mb.get("doc_ids"))
        h = stage.embed(tokens.reshape(-1)) if stage.pre_process else x
        h, _ = stage.run_layers(h, positions, plan)
        if not stage.post_process:
            return h, {}
        logits = stage.logits(stage.final_norm(h))
        ce = token_cross_entropy(logits, mb["labels"].reshape(-1))
        mask = mb["loss_mask"].reshape(-1)
        loss = masked_mean(ce, mask)
        return loss, {"lm_loss": loss.item(), "tokens": float(mask.sum().item())}
