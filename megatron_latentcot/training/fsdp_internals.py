"""The one place that uses FSDP2's private internals: "reduce these units' gradients now".

No public API of torch 2.13 does it. ``FSDPModule`` offers ``set_requires_gradient_sync`` (which
reduces inside the hooks of the *next* backward), ``unshard``/``reshard``, prefetch lists and
``set_is_last_backward``, but a reduce-scatter is only ever issued by FSDP's autograd
post-backward hooks or its root's final backward callback (``FSDPParamGroup.post_backward``,
read in torch/distributed/fsdp/_fully_shard). Our units are used a different number of times per
iteration on each data-parallel rank (the latent loop runs different step counts), so
hook-driven reduction would issue different collectives on each rank; :func:`reduce_now` runs
the steps of FSDP's final callback once per unit after the last backward instead. Pinned to
the torch versions the data-parallel equivalence tests ran on (:func:`check_torch`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from megatron_latentcot.config import ConfigError

TESTED_TORCH = (2, 13)  # the data-parallel equivalence tests ran on these minor versions


def check_torch() -> None:
    """Refuse a torch whose FSDP2 internals differ from the ones :func:`reduce_now` drives;
    warn on a newer, untested one that still has them."""
    version = torch.torch_version.TorchVersion(torch.__version__)
    if version < TESTED_TORCH:
        raise ConfigError(f"parallel.zero=fsdp2 needs torch >= {TESTED_TORCH[0]}.{TESTED_TORCH[1]} "
                          f"(FSDP2's reduce_scatter_unused_params), found {torch.__version__}: "
                          "upgrade torch or set parallel.zero=none")
    from torch.distributed.fsdp._fully_shard import _fsdp_common, _fsdp_param_group

    group = _fsdp_param_group.FSDPParamGroup
    missing = [name for name, ok in [
        ("FSDPParamGroup.post_backward", hasattr(group, "post_backward")),
        ("FSDPParamGroup.finalize_backward", hasattr(group, "finalize_backward")),
        ("TrainingState.IDLE", hasattr(_fsdp_common.TrainingState, "IDLE")),
    ] if not ok]
    if missing:
        raise ConfigError(f"parallel.zero=fsdp2: torch {torch.__version__} lacks the FSDP2 "
                          f"internals it drives ({', '.join(missing)}); use torch "
                          f"{TESTED_TORCH[0]}.{TESTED_TORCH[1]} or set parallel.zero=none")
    if version >= (TESTED_TORCH[0], TESTED_TORCH[1] + 1):
        warnings.warn(f"parallel.zero=fsdp2 reduces through FSDP2 internals tested on torch "
                      f"{TESTED_TORCH[0]}.{TESTED_TORCH[1]} only, not {torch.__version__}: run "
                      "tests/test_parallel_equivalence.py before trusting it", stacklevel=2)


def reduce_now(units: list[nn.Module]) -> None:
    """Reduce-scatter each unit's accumulated gradients once, in ``units`` order (the same on
    every rank), wait for the reductions, then free the gathered parameters.

    Gradients accumulated in ``reduce_dtype`` while sync was off (FSDP's mixed precision) are
    reduced from that fp32 accumulator. On CUDA the reductions run on FSDP's reduce-scatter
    stream; the current stream waits on their events before the update reads the shards.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    groups = []
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group
        unit.set_requires_gradient_sync(True, recurse=False)
        group.post_backward()
        unit.set_requires_gradient_sync(False, recurse=False)
        groups.append(group)
    for unit, group in zip(units, groups, strict=True):
        group.finalize_backward()
        for rs in group.comm_ctx.reduce_scatter_states:
            if rs.event is not None:
                group.device_handle.current_stream().wait_event(rs.event)
        group.comm_ctx.reduce_scatter_states.clear()
        group._training_state = TrainingState.IDLE
        unit.reshard()
