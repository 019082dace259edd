"""Process groups: torch.distributed + megatron-core ``parallel_state`` on NCCL or gloo.

Rank order follows megatron-core's default (tensor fastest, then data, then pipeline), so
``global_rank = (pp_rank * dp + dp_rank) * tp + tp_rank``. The FSDP2 device mesh is built with
the same order and checked against megatron's data-parallel group.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_latentcot.config import ConfigError, ParallelConfig


class LaunchError(RuntimeError):
    """The launch environment (ranks, world size, rendezvous) is inconsistent."""


def _install_cpu_shim() -> None:
    """megatron-core's parallel layers allocate on ``torch.cuda.current_device()``.

    Without CUDA that call raises; pointing it at the CPU is all they need to run on gloo.
    Applied only when CUDA is unavailable, in this one place.
    """
    if not torch.cuda.is_available() and not getattr(torch.cuda, "_mlc_cpu_shim", False):
        torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
        torch.cuda._mlc_cpu_shim = True  # type: ignore[attr-defined]


_install_cpu_shim()

import warnings  # noqa: E402

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": by design
    warnings.simplefilter("ignore", UserWarning)
    from megatron.core import (
        parallel_state,  # noqa: E402  (needs the shim on CPU)
        tensor_parallel,  # noqa: E402, F401
    )


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    sequence_parallel: bool = False

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_pipeline_model_parallel_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    def p2p_group(self, kind: str, upward: bool) -> dist.ProcessGroup | None:
        """The communicator of one pipeline message stream: ``kind`` "F" (activations) or "B"
        (gradients), sent to a higher stage (``upward``) or a lower one.

        Why four: NCCL serialises every send and receive between two ranks of one communicator
        on one stream, and a send of a large message waits for the matching receive. With
        PP = 2 the latent loop's wrap-around (the last stage's output back to stage 0, and its
        gradient) runs against the ordinary direction between the same two ranks; on one
        communicator each rank's send would wait behind the other's. One communicator per
        (kind, direction) carries one ordered stream per pair (``schedules.check_links``).
        """
        if kind == "F" and upward:
            return None  # the default group
        if kind == "B" and not upward:
            return self.pp_group
        forward_down, backward_up = _WRAP_GROUPS[(self.dp_rank, self.tp_rank)]
        return forward_down if kind == "F" else backward_up

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of the rank holding the same (tp, dp) position on stage ``pp_rank``."""
        return (pp_rank * self.dp_size + self.dp_rank) * self.tp_size + self.tp_rank

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes logs: first of the last stage (it sees the loss)."""
        return self.rank == (self.pp_size - 1) * self.dp_size * self.tp_size


def _env_int(name: str, *fallbacks: str) -> int | None:
    for key in (name, *fallbacks):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                raise LaunchError(f"environment variable {key}={os.environ[key]!r} is not an "
                                  "integer") from None
    return None


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list such as ``node[001-004,007],gpu-a[1,3]``, in order.

    Slurm's compact hostlist syntax (what ``scontrol show hostnames`` expands), done here so a
    launch needs no Slurm tools: comma-separated hosts, each with any number of bracketed lists
    of numbers and ranges; a range keeps the zero padding of its first bound.
    """
    hosts = re.findall(r"[^,\[\]]*(?:\[[^\[\]]*\][^,\[\]]*)*", nodelist)
    hosts = [h for h in hosts if h]
    if not hosts or ",".join(hosts) != nodelist:
        raise LaunchError(f"Slurm node list {nodelist!r}: expected hosts like "
                          "'node[001-004,007],gpu-a[1,3]'")
    out: list[str] = []
    for host in hosts:
        names = [""]
        for i, part in enumerate(re.split(r"\[([^\]]*)\]", host)):
            if i % 2 == 0:  # literal text between brackets
                names = [n + part for n in names]
                continue
            values: list[str] = []
            for item in part.split(","):
                m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
                if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
                    raise LaunchError(f"Slurm node list {nodelist!r}: bad range {item!r} in "
                                      f"[{part}] (expected numbers like 001-004 or 7)")
                lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
                values += [str(v).zfill(len(m[1])) for v in range(lo, hi + 1)]
            names = [n + v for n in names for v in values]
        out += names
    return out


def slurm_rendezvous(environ: Mapping[str, str]) -> dict[str, str]:
    """``MASTER_ADDR``/``MASTER_PORT`` for an ``srun`` launch, where they are not set.

    The first host of the job's node list, and ``10000 + SLURM_JOB_ID % 50000`` (the port
    Megatron-LM's Slurm scripts use, the same on every node of the job); an explicit
    ``MASTER_ADDR``/``MASTER_PORT`` wins. Empty outside Slurm.
    """
    out = {}
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in environ and nodelist:
        out["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if "MASTER_PORT" not in environ and job:
        if not job.isdigit():
            raise LaunchError(f"environment variable SLURM_JOB_ID={job!r} is not an integer")
        out["MASTER_PORT"] = str(10000 + int(job) % 50000)
    return out


# (dp rank, tp rank) -> this pipeline's (activations downward, gradients upward) groups: see
# ParallelContext.p2p_group. Built with megatron's groups, on every rank in the same order.
_WRAP_GROUPS: dict[tuple[int, int], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def _build_wrap_groups(tp: int, pp: int, dp: int) -> None:
    _WRAP_GROUPS.clear()
    if pp == 1:
        return
    for d in range(dp):
        for t in range(tp):
            ranks = [(s * dp + d) * tp + t for s in range(pp)]
            _WRAP_GROUPS[(d, t)] = (dist.new_group(ranks), dist.new_group(ranks))


def init_distributed(cfg: ParallelConfig) -> ParallelContext:
    """Start (or join) the process group from torchrun's or Slurm's (``srun``) environment.

    Without either, or with a world of one, starts the group on an in-process store (no port),
    so the same code path runs in a plain ``python`` process.
    """
    rank = _env_int("RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID")
    if (rank is None) != (world is None):
        have, missing = ("RANK/SLURM_PROCID", "WORLD_SIZE/SLURM_NTASKS") if world is None else \
            ("WORLD_SIZE/SLURM_NTASKS", "RANK/SLURM_PROCID")
        raise LaunchError(f"{have} is set but {missing} is not: set both (torchrun and srun "
                          "do), or neither for a single process")
    store = None
    if rank is None:
        rank, world = 0, 1
    assert world is not None
    if world == 1:  # a world of one: an in-process store, no port to bind or pass on
        store = dist.HashStore()
    else:
        os.environ.update(slurm_rendezvous(os.environ))
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise LaunchError("MASTER_ADDR and MASTER_PORT must be set for a multi-process "
                              "launch (under srun they default to the first host of "
                              "SLURM_JOB_NODELIST and 10000 + SLURM_JOB_ID % 50000)")
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    if world % (tp * pp) != 0:
        raise ConfigError(f"world size {world} is not divisible by parallel."
                          f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp * pp}")
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank is None and world > 1:
            raise LaunchError("LOCAL_RANK (or SLURM_LOCALID) is not set: with NCCL each process "
                              "must know which GPU of its node is its own")
        device = torch.device("cuda", local_rank or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if store is None:
            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        dist.init_process_group(backend, rank=rank, world_size=world, store=store,
                                timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    if parallel_state.model_parallel_is_initialized() and (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size()) != (tp, pp):
        parallel_state.destroy_model_parallel()
    # Reused when the sizes match: megatron's destroy only drops its references, so building
    # the groups again (every model a process loads) would leak their gloo threads.
    dp = world // (tp * pp)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=cfg.timeout_minutes,  # a float: seconds work in tests
        )
        _build_wrap_groups(tp, pp, dp)
    ctx = ParallelContext(
        rank=rank, world_size=world, local_rank=local_rank or 0,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(), pp_size=pp,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp,
        device=device, sequence_parallel=cfg.sequence_parallel,
    )
    expected = (ctx.pp_rank * dp + ctx.dp_rank) * tp + ctx.tp_rank
    if expected != rank:  # our p2p and mesh code rely on this order
        raise LaunchError(f"unexpected megatron rank order: rank {rank} is tp={ctx.tp_rank} "
                          f"dp={ctx.dp_rank} pp={ctx.pp_rank}")
    return ctx


def data_parallel_mesh(ctx: ParallelContext):
    """1-D device mesh over this rank's data-parallel group, for FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (ctx.pp_size, ctx.dp_size, ctx.tp_size),
                            mesh_dim_names=("pp", "dp", "tp"))
    dp_mesh = mesh["dp"]
    ours = sorted(dist.get_process_group_ranks(dp_mesh.get_group()))
    megatron = sorted(dist.get_process_group_ranks(ctx.dp_group))
    if ours != megatron:
        raise LaunchError(f"FSDP2 data-parallel mesh {ours} differs from megatron's {megatron}")
    return dp_mesh


def destroy_distributed() -> None:
    """Tear down cleanly; the barrier avoids an abort at exit with FSDP2 on gloo."""
    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        _WRAP_GROUPS.clear()
        dist.destroy_process_group()
