"""Crash-safe per-rank checkpoints.

Layout: ``<save>/iter_0000100/{rank_00000.pt, ..., manifest.json}`` and ``<save>/latest``.
Everything is written under a temporary name, fsync'ed and renamed; ``latest`` is replaced
last, atomically. A crash at any moment therefore leaves ``latest`` pointing at a complete
checkpoint, and the manifest's checksums catch a file damaged afterwards. ``<save>/run.lock``
(:class:`RunLock`) keeps a second run out of a directory in use.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import random
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_latentcot.fileutil import sha256_file
from megatron_latentcot.training.faults import fault_point

if TYPE_CHECKING:  # parallel.py imports megatron-core: keep this module light
    from megatron_latentcot.parallel import ParallelContext

LATEST = "latest"
MANIFEST = "manifest.json"
LOCK = "run.lock"
LOCK_HEARTBEAT_S = 30.0  # how often the lock's holder renews it (RunLock)


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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # do not leave a partial file filling the disk
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)




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


def reseed(seed: int, iteration: int) -> int:
    """Seed python, numpy and torch from ``seed`` and ``iteration``, the same on every rank.

    For a resume whose saved per-rank RNG states do not fit the running layout. Returns the seed.
    """
    value = (seed * 1_000_003 + iteration) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # all devices
    return value


def remove_checkpoints(root: str | Path) -> None:
    """Delete ``latest`` (first: no pointer to a half-deleted checkpoint), then every ``iter_*``
    (``train.overwrite``)."""
    (Path(root) / LATEST).unlink(missing_ok=True)
    _prune(Path(root), 0, protect=set())


def layout(ctx: ParallelContext) -> dict[str, int]:
    return {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size, "world": ctx.world_size}


def _clear_stale(root: Path) -> None:
    """Remove leftovers of interrupted saves and prunes (never a complete ``iter_*``)."""
    for p in root.glob(".iter_*"):
        if p.name.endswith((".tmp", ".deleting")) or (
                p.name.endswith(".old") and (root / p.name[1:-4]).is_dir()):
            shutil.rmtree(p, ignore_errors=True)
    for p in [*root.glob("*.partial"), *root.glob(".write_probe.*")]:
        p.unlink(missing_ok=True)


def agree(ctx: ParallelContext, error: str | None) -> None:
    """Collective: raise the same CheckpointError on every rank if any rank had ``error``."""
    if ctx.world_size > 1:
        errors: list[str | None] = [None] * ctx.world_size
        dist.all_gather_object(errors, error)
    else:
        errors = [error]
    by_error: dict[str, list[int]] = {}
    for r, e in enumerate(errors):
        if e:
            by_error.setdefault(e, []).append(r)
    if by_error:  # the same error on many ranks is said once
        raise CheckpointError("; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}: {e}"
            for e, ranks in by_error.items()))


def save_checkpoint(save_dir: str | Path, iteration: int, payload: dict[str, Any],
                    manifest: dict[str, Any], ctx: ParallelContext, keep_last: int,
                    protect: str | None = None) -> Path:
    """Write this rank's ``payload`` (model/optimizer state dicts may hold DTensors).

    Collective: every rank must call it, and every rank raises the same CheckpointError when
    any rank fails (unwritable directory, full disk), with the previous checkpoint and
    ``latest`` untouched. ``protect`` names a checkpoint never to prune (the one this run
    resumed from).
    """
    root = Path(save_dir)
    name = f"iter_{iteration:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    untouched = "the previous checkpoint and 'latest' are untouched"
    error = None
    if ctx.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _clear_stale(root)
            tmp.mkdir()
        except OSError as e:
            error = f"cannot create checkpoint directory {tmp} ({e})"
    agree(ctx, error)
    fault_point("save:start", iteration=iteration)
    rank_file = tmp / f"rank_{ctx.rank:05d}.pt"
    digest = error = None
    try:
        buf = io.BytesIO()
        torch.save(_to_local_cpu(payload), buf)
        _fsync_write(rank_file, buf.getvalue())
        digest = sha256_file(rank_file)
    except OSError as e:
        error = f"cannot write {rank_file} ({e})"
    fault_point("save:after_rank_file", iteration=iteration)
    if ctx.world_size > 1:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, (rank_file.name, digest, error))
    else:
        gathered = [(rank_file.name, digest, error)]
    failed = [f"rank {r}: {e}" for r, (_, _, e) in enumerate(gathered) if e]
    if failed:  # every rank knows: all raise the same error, no further collective
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs
        raise CheckpointError(f"{'; '.join(failed)}; {untouched}")
    error = None
    if ctx.rank == 0:
        try:
            full = dict(manifest, iteration=iteration, layout=layout(ctx),
                        files={f: d for f, d, _ in gathered})
            _fsync_write(tmp / MANIFEST, json.dumps(full, indent=1, sort_keys=True).encode())
            _fsync_dir(tmp)
            fault_point("save:before_rename", iteration=iteration)
            old = root / f".{name}.old"
            if final.exists():  # a leftover of an interrupted run: move it aside, not delete
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
            fault_point("save:before_latest", iteration=iteration)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"cannot finish {final} ({e}); {untouched}"
        else:
            try:
                _fsync_write(root / LATEST, f"{name}\n".encode())
                _fsync_dir(root)
            except OSError as e:
                error = (f"wrote {final} but cannot update {root / LATEST} ({e}); 'latest' "
                         "still names the previous checkpoint")
    agree(ctx, error)
    if ctx.rank == 0:
        fault_point("save:before_prune", iteration=iteration)
        _prune(root, keep_last, protect={name, protect})
    _barrier(ctx)
    return final


def _prune(root: Path, keep_last: int, protect: set[str | None]) -> None:
    """Delete all but the newest ``keep_last``; rename first, so no half-deleted ``iter_*``."""
    ckpts = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in ckpts[:len(ckpts) - keep_last]:
        if old.name not in protect:
            doomed = root / f".{old.name}.deleting"
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking ``iter_*`` directories (with a manifest), oldest first."""
    return sorted(p for p in Path(root).glob("iter_*") if (p / MANIFEST).is_file())


def latest_checkpoint(load_dir: str | Path) -> Path | None:
    """The directory ``latest`` points at, or None when nothing was saved yet."""
    root = Path(load_dir)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: unreadable ({e})") from e
    path = root / name
    if not name.startswith("iter_") or "/" in name or not (path / MANIFEST).is_file():
        hint = ""
        if (root / f".{name}.old").is_dir():
            hint = (f"; a save was interrupted while replacing it: rename {root / f'.{name}.old'} "
                    f"to {path}")
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint{hint}")
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path / MANIFEST}: not a checkpoint manifest")
    return manifest


def verify_checkpoint(path: Path) -> list[str]:
    """Problems with every file of a checkpoint (checksums, missing files); [] when sound."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for fname, digest in manifest["files"].items():
        f = path / fname
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{f}: checksum mismatch")
    return problems


def load_checkpoint(path: Path, ctx: ParallelContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and verify this rank's payload (same layout only). Returns (payload, manifest).

    A checkpoint of another layout is re-sliced by ``reshard.resliced_payload`` instead.
    """
    manifest = read_manifest(path)
    if manifest.get("layout") != layout(ctx):
        raise CheckpointError(
            f"{path}: saved with parallel layout {manifest.get('layout')}, this run is "
            f"{layout(ctx)}; a rank file fits only the same tensor/pipeline/data-parallel sizes "
            "(reshard.py re-slices a checkpoint for others)")
    rank_file = path / f"rank_{ctx.rank:05d}.pt"
    expected = manifest["files"].get(rank_file.name)
    if expected is None or not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: missing from the checkpoint")
    if sha256_file(rank_file) != expected:
        raise CheckpointError(f"{rank_file}: checksum mismatch (file corrupt or truncated); "
                              f"resume from an earlier checkpoint by pointing {path.parent / LATEST} "
                              "at it")
    try:
        payload = torch.load(rank_file, map_location="cpu", weights_only=False)
    except Exception as e:  # checksum matched, so this is a bug or a foreign file
        raise CheckpointError(f"{rank_file}: cannot be read ({e})") from e
    state = payload.get("state", {}) if isinstance(payload, dict) else {}
    for key in ("iteration", "consumed_tokens", "train_flops"):
        if key in manifest and state.get(key) != manifest[key]:
            raise CheckpointError(f"{rank_file}: {key} is {state.get(key)!r} but the manifest says "
                                  f"{manifest[key]!r} (files of different saves mixed?)")
    return payload, manifest


def saved_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's config with the fields added since it was saved at their defaults, so a
    newer version of the code sees no difference where the run's settings did not change (as
    saved when it no longer parses, e.g. a section since removed)."""
    from megatron_latentcot.config import ConfigError, config_from_dict

    saved = manifest.get("config", {})
    try:
        return config_from_dict(saved).to_dict()
    except (ConfigError, TypeError, ValueError):
        return saved


def config_diff(saved: dict[str, Any], current: dict[str, Any],
                sections: tuple[str, ...] | None = None,
                ignore: tuple[str, ...] = ()) -> list[str]:
    """``section.field: saved -> current`` for every differing field."""
    out = []
    for sec in sections or tuple(sorted(set(saved) | set(current))):
        a, b = saved.get(sec) or {}, current.get(sec) or {}
        for key in sorted(set(a) | set(b)):
            if f"{sec}.{key}" not in ignore and a.get(key) != b.get(key):
                out.append(f"{sec}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


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
    """Load, then re-wrap state tensors of DTensor (FSDP2-sharded) params as DTensors.

    The global shape and stride are the parameter's: inferred from the local pieces they would
    be wrong wherever FSDP2 shards unevenly (a (1, d) router weight over two ranks is one row
    and an empty shard, not 2 x 1 rows).
    """
    optimizer.load_state_dict(state)
    from torch.distributed.tensor import DTensor

    names = {id(p): n for g in optimizer.param_groups
             for p, n in zip(g["params"], g.get("param_names", []))}
    for p, st in optimizer.state.items():
        for key, v in st.items():
            if not torch.is_tensor(v) or v.dim() == 0 or isinstance(v, DTensor):
                continue
            if v.shape != _local(p).shape:
                raise CheckpointError(f"optimizer state '{key}' of {names.get(id(p), 'a parameter')} "
                                      f"has shape {tuple(v.shape)}, this rank's parameter "
                                      f"{tuple(_local(p).shape)}")
            if isinstance(p, DTensor):
                st[key] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                             shape=p.shape, stride=p.stride())


# -- one run per output directory ---------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """When ``pid`` started (/proc, clock ticks since boot), to tell a reused pid from the
    process that took a lock; None without /proc or once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, proc_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start


class RunLock:
    """``<dir>/run.lock``: one run at a time writes into a checkpoint directory.

    Created atomically (``O_CREAT | O_EXCL``) by rank 0 before the run touches the directory,
    removed at exit. It records the host, pid and start time of the run, and a heartbeat that a
    thread of the holder rewrites every ``heartbeat_s``. A lock left behind by a crash or a
    SIGKILL is stale and taken over, with a log line:

    - written on this host: when its pid is gone (or now names another process: /proc start
      times differ);
    - written on another host, whose pids cannot be checked: when its heartbeat has not changed
      for 2.5 heartbeats (75 s by default), which the newcomer watches once before refusing or
      taking over. Only the lock's content is compared, never two hosts' clocks.

    A lock that this process holds already (an earlier Trainer of the same process) is handed
    over. Every lock still held is released at interpreter exit.
    """

    held: dict[Path, RunLock] = {}  # by lock path: the locks this process holds

    def __init__(self, directory: str | Path, heartbeat_s: float = LOCK_HEARTBEAT_S):
        self.path = Path(directory).resolve() / LOCK
        self.heartbeat_s = heartbeat_s
        pid = os.getpid()
        self.me = {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def describe(holder: dict[str, Any]) -> str:
        return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                f"{holder.get('started', '?')}")

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        """The lock's content; None when there is no lock, {} when it is unreadable."""
        try:
            holder = json.loads((path or self.path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _mine(self, holder: dict[str, Any] | None) -> bool:
        return bool(holder) and all(holder.get(k) == v for k, v in self.me.items())

    def _content(self) -> bytes:
        return json.dumps(dict(self.me, heartbeat=self.beats)).encode()

    def _stale(self, holder: dict[str, Any], log: Callable[[str], None]) -> str | None:
        """Why ``holder``'s lock is stale, or None while its run is alive."""
        pid = holder.get("pid")
        if holder.get("host") == self.me["host"] and isinstance(pid, int):
            if pid == os.getpid() or not _alive(pid, holder.get("proc_start")):
                return f"its process {pid} has ended"
            return None
        wait = 2.5 * self.heartbeat_s
        log(f"{self.path} is held by a run on another host ({self.describe(holder)}): watching "
            f"its heartbeat for {wait:g} s")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(min(self.heartbeat_s / 4, max(0.0, deadline - time.monotonic())))
            if self._read() != holder:
                return None  # renewed (or released: the caller tries again)
        return f"its heartbeat has not changed for {wait:g} s"

    def acquire(self, log: Callable[[str], None]) -> None:
        """Take the lock or raise CheckpointError naming its holder (one line)."""
        previous = RunLock.held.get(self.path)
        if previous is not None:
            previous.release()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile
                why = self._stale(holder, log)
                if why is None:
                    if self._read() is None:
                        continue
                    raise CheckpointError(
                        f"in use by another run ({self.describe(holder)}; lock file "
                        f"{self.path}); two runs saving into one directory corrupt each "
                        "other's checkpoints: wait for that run to end or use another "
                        "directory") from None
                aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                if self._read(aside) != holder:  # another newcomer's fresh lock, moved by mistake: back
                    os.replace(aside, self.path)
                    continue
                aside.unlink()
                log(f"took over the stale lock {self.path} ({self.describe(holder)}): {why}")
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(self._content())
                f.flush()
                os.fsync(f.fileno())
            RunLock.held[self.path] = self
            self._thread = threading.Thread(target=self._beat, name="mlc-run-lock", daemon=True)
            self._thread.start()
            return
        raise CheckpointError(f"{self.path}: cannot take the lock, other runs are starting "
                              "into this directory at the same time")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beats += 1
            try:
                if not self._mine(self._read()):
                    return  # taken over: a newcomer judged this run dead
                _fsync_write(self.path, self._content())
            except OSError:
                pass  # a missed beat; 2.5 beats go by before anyone judges

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if this run holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if RunLock.held.get(self.path) is self:
            del RunLock.held[self.path]
            if self._mine(self._read()):
                self.path.unlink(missing_ok=True)


atexit.register(lambda: [lock.release() for lock in list(RunLock.held.values())])
