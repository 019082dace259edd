"""Crash-safe per-rank checkpoints.

Layout: ``<save>/iter_0000100/{rank_00000.pt, ..., manifest.json}`` and ``<save>/latest``.
Everything is written under a temporary name, fsync'ed and renamed; ``latest`` is replaced
last, atomically. A crash at any moment therefore leaves ``latest`` pointing at a complete
checkpoint, and the manifest's checksums catch a file damaged afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_latentcot.parallel import ParallelContext

LATEST = "latest"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or from an incompatible run."""


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _to_local_cpu(tree: Any) -> Any:
    if torch.is_tensor(tree):
        return _local(tree).detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: _to_local_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_local_cpu(v) for v in tree)
    return tree


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def layout(ctx: ParallelContext) -> dict[str, int]:
    return {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size, "world": ctx.world_size}


def save_checkpoint(save_dir: str | Path, iteration: int, payload: dict[str, Any],
                    manifest: dict[str, Any], ctx: ParallelContext, keep_last: int,
                    protect: str | None = None) -> Path:
    """Write this rank's ``payload`` (model/optimizer state dicts may hold DTensors).

    Collective: every rank must call it. ``protect`` names a checkpoint never to prune
    (the one this run resumed from).
    """
    root = Path(save_dir)
    name = f"iter_{iteration:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if ctx.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            raise CheckpointError(f"{root}: cannot create checkpoint directory ({e})") from e
    _barrier(ctx)
    rank_file = tmp / f"rank_{ctx.rank:05d}.pt"
    try:
        import io

        buf = io.BytesIO()
        torch.save(_to_local_cpu(payload), buf)
        _fsync_write(rank_file, buf.getvalue())
    except OSError as e:
        raise CheckpointError(f"{rank_file}: cannot write checkpoint ({e}); the previous "
                              "checkpoint is untouched") from e
    digests = [None] * ctx.world_size if ctx.world_size > 1 else None
    mine = (rank_file.name, _sha256(rank_file))
    if digests is not None:
        dist.all_gather_object(digests, mine)
    else:
        digests = [mine]
    if ctx.rank == 0:
        full = dict(manifest, iteration=iteration, layout=layout(ctx),
                    files=dict(digests))  # type: ignore[arg-type]
        _fsync_write(tmp / MANIFEST, json.dumps(full, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _fsync_write(root / LATEST, f"{name}\n".encode())
        _fsync_dir(root)
        _prune(root, keep_last, protect={name, protect})
    _barrier(ctx)
    return final


def _prune(root: Path, keep_last: int, protect: set[str | None]) -> None:
    ckpts = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in ckpts[:-keep_last]:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def latest_checkpoint(load_dir: str | Path) -> Path | None:
    """The directory ``latest`` points at, or None when nothing was saved yet."""
    root = Path(load_dir)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name.startswith("iter_") or not (path / MANIFEST).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: Path, ctx: ParallelContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and verify this rank's payload. Returns (payload, manifest)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable manifest ({e})") from e
    if manifest.get("layout") != layout(ctx):
        raise CheckpointError(
            f"{path}: saved with parallel layout {manifest.get('layout')}, this run is "
            f"{layout(ctx)}; resume with the same tensor/pipeline/data-parallel sizes")
    rank_file = path / f"rank_{ctx.rank:05d}.pt"
    expected = manifest.get("files", {}).get(rank_file.name)
    if expected is None or not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: missing from the checkpoint")
    if _sha256(rank_file) != expected:
        raise CheckpointError(f"{rank_file}: checksum mismatch (file corrupt or truncated)")
    payload = torch.load(rank_file, map_location="cpu", weights_only=False)
    return payload, manifest


@torch.no_grad()
def restore_model(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]} (a different model shape?)")
    for name, value in state.items():
        if not torch.is_tensor(current[name]):  # megatron layers' empty ``_extra_state``
            continue
        target = _local(current[name])
        if target.shape != value.shape:
            raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(target.shape)}")
        target.copy_(value)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load, then re-wrap state tensors of DTensor (FSDP2-sharded) params as DTensors."""
    optimizer.load_state_dict(state)
    from torch.distributed.tensor import DTensor

    for p, st in optimizer.state.items():
        if isinstance(p, DTensor):
            for key, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0 and not isinstance(v, DTensor):
                    st[key] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements)
