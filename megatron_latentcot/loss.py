"""Language-model losses on vocab-parallel logits (no full-vocab gather on TP ranks)."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE. logits: [N, 1, V/tp] vocab-parallel; labels: [N] -> [N] (float32)."""
    return vocab_parallel_cross_entropy(logits.float(), labels.view(-1, 1)).view(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (1 = counted); 0 when nothing is counted."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
