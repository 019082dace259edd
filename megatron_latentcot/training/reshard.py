"""Checkpoints across parallel layouts: full logical tensors from per-rank files, and back.

A rank file (``rank_XXXXX.pt``, see checkpoint.py) holds that rank's pieces of every tensor:

- tensor parallelism: a slice along the weight's ``partition_dim``, or, for the fused QKV and
  gate/up weights, a slice of each logical part (``q_proj``, ``k_proj``, ... one after another);
  replicated tensors (norms, router) are whole on every TP rank;
- pipeline parallelism: only its stage's layers, named by global layer index, so stages merge
  by name;
- data parallelism: with FSDP2 (``parallel.zero=fsdp2`` and DP > 1) a dim-0 shard of the TP
  slice (``torch.chunk`` rows, as FSDP2's ``Shard(0)``); otherwise every DP rank holds the same
  tensors and only DP rank 0's file is read.

The same holds for AdamW's per-parameter state: ``exp_avg`` / ``exp_avg_sq`` are shaped (and
sharded) like their parameter, ``step`` is a scalar. :func:`assemble` rebuilds a full tensor
from its pieces, :func:`local_piece` cuts the piece a rank of another layout holds, and
:func:`resliced_payload` builds, for this rank of the running layout, exactly the payload it
would have saved itself (model, optimizer, train state), so that the usual restore applies.
Also used by ``inference/loading.py`` to load any checkpoint into one process. No megatron-core
import at module level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_latentcot.fileutil import sha256_file
from megatron_latentcot.training.checkpoint import CheckpointError

if TYPE_CHECKING:
    from megatron_latentcot.parallel import ParallelContext

# name -> ("fused", logical row counts) | ("split", partition dim) | ("replicated", None)
Layouts = dict[str, tuple[str, Any]]


@dataclass(frozen=True)
class RankPos:
    tp: int
    dp: int
    pp: int


def rank_positions(layout: dict[str, int]) -> dict[int, RankPos]:
    """Global rank -> (tp, dp, pp), megatron's order (tensor fastest, then data, then pipeline)."""
    tp, dp = layout["tp"], layout["dp"]
    return {r: RankPos(r % tp, (r // tp) % dp, r // (tp * dp)) for r in range(layout["world"])}


def param_layouts(stage: torch.nn.Module) -> Layouts:
    """State-dict key -> how the tensor is split over TP ranks.

    Reads megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes, which FSDP2's
    ``fully_shard`` drops: call it on the unsharded model.
    """
    from megatron_latentcot.model.llama import FusedColumnParallelLinear

    out: Layouts = {}
    for mname, module in stage.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            key = f"{mname}.{pname}" if mname else pname
            if isinstance(module, FusedColumnParallelLinear):
                out[key] = ("fused", list(module.parts.values()))
            elif getattr(p, "tensor_model_parallel", False):
                out[key] = ("split", int(p.partition_dim))
            else:
                out[key] = ("replicated", None)
    return out


def stitch(kind: str, info: Any, pieces: list[torch.Tensor]) -> torch.Tensor:
    """TP-rank pieces (in TP-rank order) -> the full tensor."""
    if kind == "replicated" or len(pieces) == 1:
        return pieces[0]
    if kind == "split":
        return torch.cat(pieces, dim=info)
    tp = len(pieces)
    split = [rows // tp for rows in info]
    per_rank = [p.split(split, dim=0) for p in pieces]
    return torch.cat([torch.cat([r[i] for r in per_rank], dim=0) for i in range(len(info))])


def tp_piece(kind: str, info: Any, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """The inverse of :func:`stitch`: TP rank ``tp_rank``'s piece of ``full``."""
    if kind == "replicated" or tp == 1:
        return full
    if kind == "split":
        return full.chunk(tp, dim=info)[tp_rank]
    return torch.cat([part.chunk(tp, dim=0)[tp_rank] for part in full.split(info, dim=0)])


def dp_rows(rows: int, dp: int, dp_rank: int) -> slice:
    """The dim-0 rows FSDP2's ``Shard(0)`` gives ``dp_rank`` (``torch.chunk``, empty at the end)."""
    per = math.ceil(rows / dp)
    start = min(dp_rank * per, rows)
    return slice(start, min(start + per, rows))


def local_piece(kind: str, info: Any, full: torch.Tensor, ctx: ParallelContext,
                dp_sharded: bool) -> torch.Tensor:
    """This rank's piece of ``full``: its TP piece, then its FSDP2 rows when ``dp_sharded``."""
    piece = tp_piece(kind, info, full, ctx.tp_size, ctx.tp_rank)
    if dp_sharded:
        piece = piece[dp_rows(piece.shape[0], ctx.dp_size, ctx.dp_rank)]
    return piece


class RankFiles:
    """The rank files of one checkpoint that hold distinct data, opened lazily (mmap)."""

    def __init__(self, ckpt_dir: Path, manifest: dict[str, Any]):
        self.dir, self.manifest = ckpt_dir, manifest
        self.layout = manifest["layout"]
        self.positions = rank_positions(self.layout)
        parallel = (manifest.get("config") or {}).get("parallel") or {}
        self.dp_sharded = parallel.get("zero") == "fsdp2" and self.layout["dp"] > 1
        # Without FSDP2 the data-parallel replicas hold the same tensors: read DP rank 0's.
        self.ranks = [r for r, pos in self.positions.items() if pos.dp == 0 or self.dp_sharded]
        self._payloads: dict[int, dict[str, Any]] = {}

    def path(self, rank: int) -> Path:
        return self.dir / f"rank_{rank:05d}.pt"

    def verify(self, ranks: list[int]) -> list[str]:
        """Problems (missing file, checksum mismatch) with the files of ``ranks``."""
        problems = []
        for rank in ranks:
            f = self.path(rank)
            expected = self.manifest["files"].get(f.name)
            if expected is None or not f.is_file():
                problems.append(f"{f}: missing from the checkpoint")
            elif sha256_file(f) != expected:
                problems.append(f"{f}: checksum mismatch (file corrupt or truncated)")
        return problems

    def payload(self, rank: int) -> dict[str, Any]:
        if rank not in self._payloads:
            f = self.path(rank)
            if f.name not in self.manifest["files"] or not f.is_file():
                raise CheckpointError(f"{f}: missing from the checkpoint")
            try:
                payload = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            except Exception as e:  # checksums are verified separately: a foreign file
                raise CheckpointError(f"{f}: cannot be read ({e})") from e
            if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
                raise CheckpointError(f"{f}: not a checkpoint rank file (no 'model' entry)")
            self._payloads[rank] = payload
        return self._payloads[rank]

    def model_states(self) -> dict[int, dict[str, Any]]:
        return {r: self.payload(r)["model"] for r in self.ranks}

    def holders(self, states: dict[int, dict[str, Any]]) -> dict[str, dict[int, Any]]:
        """name -> {rank: value}, one rank per (tp, dp) position.

        A name on two stages (tied embeddings) is taken from the first.
        """
        out: dict[str, dict[int, Any]] = {}
        seen: set[tuple[str, int, int]] = set()
        for rank in sorted(states):
            pos = self.positions[rank]
            for name, value in states[rank].items():
                if name.endswith("_extra_state") or (name, pos.tp, pos.dp) in seen:
                    continue
                seen.add((name, pos.tp, pos.dp))
                out.setdefault(name, {})[rank] = value
        return out

    def assemble(self, name: str, pieces: dict[int, torch.Tensor],
                 layouts: Layouts | None, what: str = "") -> torch.Tensor:
        """The full tensor from its pieces ({rank: piece}, as :meth:`holders` gives)."""
        label = f"{name}{f' ({what})' if what else ''}"
        tp_size = self.layout["tp"]
        per_tp: dict[int, dict[int, torch.Tensor]] = {}
        for rank, piece in pieces.items():
            pos = self.positions[rank]
            per_tp.setdefault(pos.tp, {})[pos.dp] = piece
        if sorted(per_tp) != list(range(tp_size)):
            raise CheckpointError(f"{label}: found on TP ranks {sorted(per_tp)} of {tp_size}")
        tp_pieces = []
        for t in range(tp_size):
            by_dp = per_tp[t]
            if self.dp_sharded and sorted(by_dp) != list(range(self.layout["dp"])):
                raise CheckpointError(f"{label}: FSDP2 shards of DP ranks {sorted(by_dp)} of "
                                      f"{self.layout['dp']} found")
            shards = [by_dp[d] for d in sorted(by_dp)]
            tp_pieces.append(torch.cat(shards, dim=0) if len(shards) > 1 else shards[0])
        if layouts is None:
            if tp_size != 1:
                raise CheckpointError("stitching tensor-parallel slices needs the parameter "
                                      "layouts")
            return tp_pieces[0]
        if name not in layouts:
            raise CheckpointError(f"checkpoint tensor {name} is not a parameter of the model")
        kind, info = layouts[name]
        try:
            return stitch(kind, info, tp_pieces)
        except RuntimeError as e:  # pieces of inconsistent shapes
            raise CheckpointError(f"{label}: TP pieces {[tuple(p.shape) for p in tp_pieces]} "
                                  f"do not stitch ({e})") from e

    def gather(self, layouts: Layouts | None) -> dict[str, torch.Tensor]:
        """Every model tensor, full (parameter names of a TP = 1 stage)."""
        holders = self.holders(self.model_states())
        return {name: self.assemble(name, pieces, layouts).clone()
                for name, pieces in holders.items()
                if all(torch.is_tensor(v) for v in pieces.values())}


# -- optimizer state by parameter name ------------------------------------------------------

def optimizer_by_name(payload: dict[str, Any], where: Path,
                      no_decay: Any = None) -> tuple[dict[str, dict[str, Any]],
                                                     dict[str, dict[str, Any]]]:
    """A rank file's AdamW state as (name -> state fields, name -> group hyperparameters).

    Names come from the param groups' ``param_names``; for files written before the optimizer
    recorded them, from the model's parameter order split into groups by ``no_decay(name)``
    (the rule optimizer.py groups with).
    """
    opt = payload.get("optimizer")
    if not isinstance(opt, dict) or "param_groups" not in opt:
        raise CheckpointError(f"{where}: no optimizer state ('optimizer' entry) to re-slice")
    groups = opt["param_groups"]
    if all("param_names" in g for g in groups):
        names = [list(g["param_names"]) for g in groups]
    else:
        params = [k for k, v in payload["model"].items()
                  if torch.is_tensor(v) and not k.endswith("_extra_state")]
        if no_decay is None:
            raise CheckpointError(f"{where}: optimizer param_groups have no 'param_names'")
        names = [g for g in ([n for n in params if not no_decay(n)],
                             [n for n in params if no_decay(n)]) if g]
    if [len(n) for n in names] != [len(g["params"]) for g in groups]:
        raise CheckpointError(
            f"{where}: optimizer param_groups hold {[len(g['params']) for g in groups]} "
            f"parameters, the model {[len(n) for n in names]}: cannot tell which state is whose")
    states, hyper = {}, {}
    for g, gnames in zip(groups, names):
        h = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        for idx, name in zip(g["params"], gnames):
            hyper[name] = h
            if idx in opt.get("state", {}):
                states[name] = opt["state"][idx]
    return states, hyper


def _show(v: Any) -> str:
    return str(v.item() if torch.is_tensor(v) and v.dim() == 0 else v)


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return type(a) is type(b) and a == b


def resliced_payload(files: RankFiles, ctx: ParallelContext, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, layouts: Layouts,
                     no_decay: Any = None) -> dict[str, Any]:
    """This rank's payload for the running layout, cut from a checkpoint of another layout.

    ``model`` / ``optimizer``: this rank's (FSDP2-sharded or not); ``layouts`` from
    :func:`param_layouts` of the model before sharding. Every tensor is checked against the
    shape this rank holds; anything that cannot be mapped raises CheckpointError naming the
    tensor and the field.
    """
    current = model.state_dict()
    states = files.model_states()
    holders = files.holders(states)
    wanted = [n for n, v in current.items() if torch.is_tensor(v)]
    missing = [n for n in wanted if n not in holders]
    if missing:
        raise CheckpointError(f"{files.dir}: no tensor {missing[:5]} in any rank file (a different "
                              "model shape?)")

    def cut(name: str, full: torch.Tensor, target: Any, what: str) -> torch.Tensor:
        kind, info = layouts[name]
        tp_shape = tuple(target.shape)  # a DTensor's shape is its TP piece's (all DP shards)
        try:
            piece = tp_piece(kind, info, full, ctx.tp_size, ctx.tp_rank)
        except RuntimeError:  # fused parts that do not add up to the full tensor
            piece = None
        if piece is None or tuple(piece.shape) != tp_shape or (
                kind == "split" and full.shape[info] != tp_shape[info] * ctx.tp_size):
            raise CheckpointError(f"{name}{what}: the checkpoint's tensor has full shape "
                                  f"{tuple(full.shape)}, this model's TP rank {ctx.tp_rank} holds "
                                  f"{tp_shape} of it (a different model shape?)")
        if hasattr(target, "to_local"):  # FSDP2: this DP rank's rows
            rows = dp_rows(piece.shape[0], ctx.dp_size, ctx.dp_rank)
            local_shape = tuple(target.to_local().shape)
            piece = piece[rows]
            if tuple(piece.shape) != local_shape:
                raise CheckpointError(f"{name}{what}: FSDP2 shard of DP rank {ctx.dp_rank} holds "
                                      f"{local_shape}, expected rows {rows.start}:{rows.stop} of "
                                      f"{tp_shape}")
        return piece.clone()

    model_out: dict[str, Any] = {}
    for name, target in current.items():
        if not torch.is_tensor(target):  # megatron layers' empty ``_extra_state``
            model_out[name] = target
            continue
        full = files.assemble(name, holders[name], layouts)
        model_out[name] = cut(name, full, target, "")

    # -- optimizer: the same re-slicing for every parameter-shaped field ---------------------
    per_rank = {r: optimizer_by_name(files.payload(r), files.path(r), no_decay)
                for r in files.ranks}
    mine = optimizer.state_dict()["param_groups"]
    params = dict(model.named_parameters())
    opt_state: dict[int, dict[str, Any]] = {}
    groups = []
    for g in mine:
        names = g.get("param_names")
        if names is None:
            raise CheckpointError("internal: the optimizer was built without parameter names")
        hyper = None
        for idx, name in zip(g["params"], names):
            ranks = holders[name]
            found = {r: per_rank[r][0].get(name) for r in ranks}
            h = per_rank[next(iter(ranks))][1].get(name)
            if h is None:
                raise CheckpointError(f"{files.path(next(iter(ranks)))}: {name} is in no "
                                      "optimizer param_group")
            if hyper is None:
                hyper, first = h, name
            elif diff := sorted(k for k in set(h) | set(hyper)
                                if not _same(h.get(k), hyper.get(k))):
                raise CheckpointError(f"optimizer param_groups: {first} and {name} share a group "
                                      f"in this run but not in the checkpoint (fields {diff} "
                                      f"differ); cannot map them")
            if all(v is None for v in found.values()):
                continue  # no step taken yet
            lacking = [files.path(r).name for r, v in found.items() if v is None]
            if lacking:
                raise CheckpointError(f"optimizer state of {name}: present in some rank files, "
                                      f"missing in {lacking}; cannot map it")
            fields = sorted(set().union(*(v.keys() for v in found.values())))
            st: dict[str, Any] = {}
            for key in fields:
                values = {r: v.get(key) for r, v in found.items()}
                label = f"optimizer state '{key}' of {name}"
                lacking = [files.path(r).name for r, v in values.items() if v is None]
                if lacking:
                    raise CheckpointError(f"{label}: missing in {lacking}; cannot map it")
                weights = {r: states[r][name] for r in values}
                if all(torch.is_tensor(v) and v.shape == weights[r].shape
                       and v.dim() > 0 for r, v in values.items()):
                    full = files.assemble(name, values, layouts, what=f"'{key}'")
                    st[key] = cut(name, full, params[name], f" optimizer state '{key}'")
                elif all(not torch.is_tensor(v) or v.dim() == 0 for v in values.values()):
                    ref = next(iter(values.values()))
                    if not all(_same(v, ref) for v in values.values()):
                        raise CheckpointError(f"{label}: differs between rank files "
                                              f"({sorted({_show(v) for v in values.values()})}); "
                                              f"cannot map it")
                    st[key] = ref.clone() if torch.is_tensor(ref) else ref
                else:
                    shapes = sorted({str(tuple(v.shape)) if torch.is_tensor(v) else type(v).__name__
                                     for v in values.values()})
                    raise CheckpointError(f"{label}: shaped {shapes}, neither a scalar nor like "
                                          f"the parameter's pieces; cannot map it")
            opt_state[idx] = st
        groups.append(dict(hyper or {}, params=list(g["params"]), param_names=list(names)))

    state = files.payload(files.ranks[0]).get("state", {})
    for r in files.ranks:
        other = files.payload(r).get("state", {})
        for key in ("iteration", "consumed_samples", "consumed_tokens", "train_flops"):
            if other.get(key) != state.get(key) or (
                    key in files.manifest and state.get(key) != files.manifest[key]):
                raise CheckpointError(f"{files.path(r)}: {key} is {other.get(key)!r}, "
                                      f"{files.path(files.ranks[0]).name} says {state.get(key)!r}, "
                                      f"the manifest {files.manifest.get(key)!r} (files of "
                                      "different saves mixed?)")
    return {"model": model_out, "optimizer": {"state": opt_state, "param_groups": groups},
            "state": dict(state)}
