"""The Router: per-token continue gate g = sigmoid(w . z + b) and the reach/exit bookkeeping.

p_reach^(1) = 1, p_reach^(k+1) = p_reach^(k) g^(k); a token continues iff p_reach^(k+1) > tau
and k < K_max; p_exit^(k) = p_reach^(k) (1 - g^(k)) except at the token's last executed step,
where all remaining mass exits (p_exit^(last) = p_reach^(last)), so exits sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """One linear layer (the paper's ablation: linear ~ MLP ~ none at 70M), replicated over TP.

    Under sequence parallelism each TP rank routes different tokens, so its gradient is partial
    and is all-reduced with the other sequence-parallel weights.
    """

    def __init__(self, hidden: int, bias_init: float, sequence_parallel: bool):
        super().__init__()
        self.bias_init = float(bias_init)
        self.weight = nn.Parameter(torch.zeros(1, hidden))  # drawn by init_weights()
        self.bias = nn.Parameter(torch.full((1,), self.bias_init))  # kept: g starts at sigmoid(b)
        for p in (self.weight, self.bias):
            p.sequence_parallel = sequence_parallel

    def reset_parameters(self) -> None:
        """The constructor's values again (after a meta-device build)."""
        with torch.no_grad():
            self.weight.zero_()
            self.bias.fill_(self.bias_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, 1, H] -> gates [N] in float32 (autocast off: routing is never bf16)."""
        zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        with torch.autocast(z.device.type, enabled=False):
            gate = F.linear(zf, self.weight.to(zf.dtype), self.bias.to(zf.dtype))
        return torch.sigmoid(gate).view(-1)


@dataclass
class Decision:
    """One step's routing for the tokens that ran it."""

    exit: torch.Tensor  # [N] p_exit^(k) (differentiable)
    reach_next: torch.Tensor  # [N] p_reach^(k+1) (differentiable; meaningful where cont)
    cont: torch.Tensor  # [N] bool: runs step k+1


def route(reach: torch.Tensor, gate: torch.Tensor | None, tau: float) -> Decision:
    """Routing of one step. ``gate`` is None at the last allowed step (everyone exits)."""
    if gate is None:
        return Decision(exit=reach, reach_next=torch.zeros_like(reach),
                        cont=torch.zeros_like(reach, dtype=torch.bool))
    reach_next = reach * gate
    cont = reach_next.detach() > tau
    return Decision(exit=torch.where(cont, reach - reach_next, reach), reach_next=reach_next,
                    cont=cont)


def decide(reach: torch.Tensor, z: torch.Tensor, k: int, max_steps: int, method: str,
           router: Router | None, tau: float) -> tuple[Decision, torch.Tensor | None]:
    """Step k's halting rule, shared by training and decoding: everyone exits at K_max;
    ``latent_fixed`` goes on (no router); ``adaptive`` routes by the gate. Returns the gates too."""
    if k == max_steps:
        return route(reach, None, 0.0), None
    if method == "latent_fixed":
        return Decision(exit=torch.zeros_like(reach), reach_next=reach,
                        cont=torch.ones_like(reach, dtype=torch.bool)), None
    gate = router(z)
    return route(reach, gate, tau), gate
