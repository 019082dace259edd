"""Checkpoint faults, for real: SIGKILL mid-save, flipped and truncated bytes, a full tmpfs, a
read-only directory, an exceeded file-size limit; and re-slicing for another parallel layout
(``reshard.py``) on synthetic rank files. Neither module imports megatron-core, so these run in
the test process (and in forked children that are killed)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_latentcot.fileutil import sha256_file
from megatron_latentcot.training import checkpoint as ckpt

CTX = SimpleNamespace(rank=0, world_size=1, tp_size=1, pp_size=1, dp_size=1)
POINTS = ["save:start", "save:after_rank_file", "save:before_rename", "save:before_latest",
          "save:before_prune"]


def _save(root: Path, it: int, numel: int = 1000, keep_last: int = 2,
          protect: str | None = None) -> Path:
    payload = {"model": {"w": torch.arange(numel, dtype=torch.float32) * it},
               "state": {"iteration": it, "consumed_tokens": 10 * it, "train_flops": 1.5 * it}}
    manifest = {"config": {"model": {"hidden_size": 8}}, "consumed_tokens": 10 * it,
                "train_flops": 1.5 * it}
    return ckpt.save_checkpoint(root, it, payload, manifest, CTX, keep_last, protect)


def _load_latest(root: Path) -> int:
    path = ckpt.latest_checkpoint(root)
    assert path is not None
    payload, manifest = ckpt.load_checkpoint(path, CTX)
    it = manifest["iteration"]
    assert torch.equal(payload["model"]["w"], torch.arange(1000, dtype=torch.float32) * it)
    return it


def _in_killed_child(fn, fault: str) -> int:
    """Run ``fn`` in a forked child with ``$MLC_FAULT``; return the signal that ended it."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.environ["MLC_FAULT"] = fault
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_inside_save_keeps_a_complete_latest(tmp_path, point):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    assert _in_killed_child(lambda: _save(tmp_path, 3), f"{point}=kill") == signal.SIGKILL
    latest = _load_latest(tmp_path)
    assert latest == (3 if point == "save:before_prune" else 2)
    for path in ckpt.list_checkpoints(tmp_path):  # whatever looks complete is complete
        assert ckpt.verify_checkpoint(path) == [], path
    # The run resumes from ``latest`` and saves the same iteration again: leftovers are cleared.
    _save(tmp_path, 3)
    _save(tmp_path, 4)
    assert _load_latest(tmp_path) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000004", "latest"]


def test_corrupt_truncated_or_missing_rank_file_is_detected(tmp_path):
    path = _save(tmp_path, 1)
    rank_file = path / "rank_00000.pt"
    good = rank_file.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    rank_file.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="rank_00000.pt: checksum mismatch"):
        ckpt.load_checkpoint(path, CTX)
    assert ckpt.verify_checkpoint(path) == [f"{rank_file}: checksum mismatch"]
    rank_file.write_bytes(good[:-100])
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(path, CTX)
    rank_file.unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing from the checkpoint"):
        ckpt.load_checkpoint(path, CTX)


def test_broken_manifest_or_latest_pointer_is_a_clear_error(tmp_path):
    path = _save(tmp_path, 1)
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.latest_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("iter_0000001\n")
    (path / "manifest.json").write_text("{ truncated")
    with pytest.raises(ckpt.CheckpointError, match="unreadable manifest"):
        ckpt.load_checkpoint(path, CTX)


def test_manifest_must_agree_with_the_rank_file(tmp_path):
    """Cumulative tokens and FLOPs in the manifest are checked against the saved state."""
    path = _save(tmp_path, 2)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["train_flops"] = 99.0
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="train_flops is 3.0 but the manifest says 99.0"):
        ckpt.load_checkpoint(path, CTX)


def test_other_parallel_layout_or_model_fails_clearly(tmp_path):
    path = _save(tmp_path, 1)
    other = SimpleNamespace(rank=0, world_size=2, tp_size=2, pp_size=1, dp_size=1)
    with pytest.raises(ckpt.CheckpointError, match="saved with parallel layout .* same tensor"):
        ckpt.load_checkpoint(path, other)
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ckpt.CheckpointError, match="does not match the model"):
        ckpt.restore_model(model, {"w": torch.zeros(3)})
    with pytest.raises(ckpt.CheckpointError, match=r"has shape \(3, 5\), the model expects \(3, 4\)"):
        ckpt.restore_model(model, {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)})
    diff = ckpt.config_diff({"model": {"hidden_size": 64}, "train": {"lr": 1.0}},
                            {"model": {"hidden_size": 32}, "train": {"lr": 1.0}})
    assert diff == ["model.hidden_size: 64 -> 32"]


def test_prune_keeps_last_n_and_the_resumed_from_checkpoint(tmp_path):
    for it in range(1, 6):
        _save(tmp_path, it, keep_last=2, protect="iter_0000001")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000001", "iter_0000004", "iter_0000005", "latest"]


def _mount_tmpfs(path: Path, size: str, options: str = "") -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    opts = f"size={size}" + (f",{options}" if options else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs: room for one 1.2 MB checkpoint, not for two."""
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "2m"):
        pytest.skip("needs root with CAP_SYS_ADMIN to mount a tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_save_leaves_previous_checkpoint(small_tmpfs):
    root = small_tmpfs / "ckpt"
    _save(root, 1, numel=300_000)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous checkpoint"):
        _save(root, 2, numel=300_000)
    assert ckpt.latest_checkpoint(root).name == "iter_0000001"
    assert ckpt.verify_checkpoint(root / "iter_0000001") == []
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest"]  # space freed
    # Once space is freed, saving works again.
    shutil.rmtree(root / "iter_0000001")
    _save(root, 3, numel=300_000)
    assert ckpt.latest_checkpoint(root).name == "iter_0000003"


def test_unwritable_checkpoint_directory(tmp_path):
    root = tmp_path / "ckpt"
    _save(root, 1)
    if os.geteuid() == 0:  # root ignores permissions: make the directory a read-only mount
        if not _mount_tmpfs(root, "1m"):
            pytest.skip("root without CAP_SYS_ADMIN cannot make a read-only directory")
        try:
            _save(root, 1)
            subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
            with pytest.raises(ckpt.CheckpointError, match="cannot create checkpoint directory.*"
                               "Read-only file system"):
                _save(root, 2)
            assert _load_latest(root) == 1
        finally:
            subprocess.run(["umount", "-l", str(root)], check=False)
    else:
        root.chmod(0o555)
        try:
            with pytest.raises(ckpt.CheckpointError, match="cannot create checkpoint directory"):
                _save(root, 2)
            assert _load_latest(root) == 1
        finally:
            root.chmod(0o755)


def test_file_size_limit_during_save(tmp_path):
    """A kernel-enforced write failure (RLIMIT_FSIZE -> EFBIG) in a child; works unprivileged."""
    _save(tmp_path, 1)

    def child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
        try:
            _save(tmp_path, 2)
        except ckpt.CheckpointError as e:
            assert "File too large" in str(e) and "untouched" in str(e), e
            os._exit(7)

    assert _in_killed_child(child, "") == -7
    assert _load_latest(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]


# -- re-slicing for another layout (reshard.py), on synthetic rank files: no processes ----------
def _fused_split_full() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"qkv.weight": torch.randn(8 + 4 + 4, 6, generator=g),  # fused q (8) / k (4) / v (4)
            "o.weight": torch.randn(6, 8, generator=g),  # row-parallel: split along dim 1
            "norm.weight": torch.randn(7, generator=g)}  # replicated over TP, 7 rows: uneven DP


LAYOUTS = {"qkv.weight": ("fused", [8, 4, 4]), "o.weight": ("split", 1),
           "norm.weight": ("replicated", None)}


def test_tp_and_fsdp2_pieces_invert_stitching():
    from megatron_latentcot.training import reshard

    for name, full in _fused_split_full().items():
        kind, info = LAYOUTS[name]
        for tp in (1, 2, 4):
            pieces = [reshard.tp_piece(kind, info, full, tp, r) for r in range(tp)]
            assert torch.equal(reshard.stitch(kind, info, pieces), full), (name, tp)
    # FSDP2's Shard(0): torch.chunk rows, empty shards at the end
    for rows, dp in ((7, 2), (5, 4), (2, 4), (8, 4)):
        t = torch.arange(rows)
        chunks = list(t.chunk(dp)) + [t[:0]] * (dp - len(t.chunk(dp)))
        for r in range(dp):
            assert torch.equal(t[reshard.dp_rows(rows, dp, r)], chunks[r]), (rows, dp, r)


def _synthetic_checkpoint(root: Path, full: dict[str, torch.Tensor], tp: int, dp: int) -> Path:
    """A TP x DP checkpoint with FSDP2-sharded weights and AdamW states, as Trainer.save writes."""
    from megatron_latentcot.training import reshard

    path = root / "iter_0000004"
    path.mkdir(parents=True)
    files = {}
    names = list(full)
    for rank in range(tp * dp):
        t, d = rank % tp, rank // tp
        model, state = {}, {}
        for i, name in enumerate(names):
            kind, info = LAYOUTS[name]
            piece = reshard.tp_piece(kind, info, full[name], tp, t)
            local = piece[reshard.dp_rows(piece.shape[0], dp, d)]
            model[name] = local.clone()
            state[i] = {"step": torch.tensor(4.0), "exp_avg": local * 0.5, "exp_avg_sq": local ** 2}
        model["qkv._extra_state"] = None
        payload = {"model": model, "state": {"iteration": 4, "consumed_samples": 32},
                   "optimizer": {"state": state, "param_groups": [
                       {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "params": [0, 1],
                        "param_names": names[:2]},
                       {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.95), "params": [2],
                        "param_names": names[2:]}]}}
        f = path / f"rank_{rank:05d}.pt"
        torch.save(payload, f)
        files[f.name] = sha256_file(f)
    manifest = {"layout": {"tp": tp, "pp": 1, "dp": dp, "world": tp * dp}, "files": files,
                "iteration": 4, "config": {"parallel": {"zero": "fsdp2"}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


class _Stage(torch.nn.Module):
    """Parameters named like the synthetic checkpoint's, shaped for TP rank ``tp_rank`` of ``tp``."""

    def __init__(self, full: dict[str, torch.Tensor], tp: int, tp_rank: int):
        from megatron_latentcot.training import reshard

        super().__init__()
        for name, t in full.items():
            piece = reshard.tp_piece(*LAYOUTS[name], t, tp, tp_rank)
            mod = torch.nn.Module()
            mod.weight = torch.nn.Parameter(torch.zeros_like(piece))
            self.add_module(name.split(".")[0], mod)
        self.optimizer = torch.optim.AdamW(
            [{"params": [(n, p) for n, p in self.named_parameters() if not n.startswith("norm")]},
             {"params": [(n, p) for n, p in self.named_parameters() if n.startswith("norm")],
              "weight_decay": 0.0}])


@pytest.mark.parametrize("tp,tp_rank", [(1, 0), (2, 1), (4, 3)])
def test_tp2_dp2_fsdp2_checkpoint_is_resliced_exactly(tmp_path, tp, tp_rank):
    from megatron_latentcot.training import reshard

    full = _fused_split_full()
    path = _synthetic_checkpoint(tmp_path, full, tp=2, dp=2)
    files = reshard.RankFiles(path, json.loads((path / "manifest.json").read_text()))
    assert files.dp_sharded and files.verify(files.ranks) == []
    assert all(torch.equal(files.gather(LAYOUTS)[n], full[n]) for n in full)
    stage = _Stage(full, tp, tp_rank)
    ctx = SimpleNamespace(rank=tp_rank, world_size=tp, tp_size=tp, tp_rank=tp_rank, pp_size=1,
                          dp_size=1, dp_rank=0)
    payload = reshard.resliced_payload(files, ctx, stage, stage.optimizer, LAYOUTS)
    assert payload["state"] == {"iteration": 4, "consumed_samples": 32}
    ckpt.restore_model(stage, payload["model"])
    ckpt.restore_optimizer(stage.optimizer, payload["optimizer"])
    for name, p in stage.named_parameters():
        mine = reshard.tp_piece(*LAYOUTS[name], full[name], tp, tp_rank)
        st = stage.optimizer.state[p]
        assert torch.equal(p.detach(), mine) and torch.equal(st["exp_avg"], mine * 0.5)
        assert torch.equal(st["exp_avg_sq"], mine ** 2) and st["step"].item() == 4.0
    assert [g["weight_decay"] for g in stage.optimizer.param_groups] == [0.1, 0.0]
    assert stage.optimizer.param_groups[0]["betas"] == (0.9, 0.95)  # the checkpoint's


def test_resliced_optimizer_state_that_cannot_be_mapped_names_the_field(tmp_path):
    from megatron_latentcot.training import reshard

    full = _fused_split_full()
    path = _synthetic_checkpoint(tmp_path, full, tp=2, dp=2)
    f = path / "rank_00003.pt"
    payload = torch.load(f, weights_only=False)
    payload["optimizer"]["state"][1]["exp_avg"] = torch.zeros(5)  # o.weight: not its shape
    torch.save(payload, f)
    manifest = json.loads((path / "manifest.json").read_text())
    files = reshard.RankFiles(path, manifest)
    assert files.verify(files.ranks) == [f"{f}: checksum mismatch (file corrupt or truncated)"]
    stage = _Stage(full, 1, 0)
    ctx = SimpleNamespace(rank=0, world_size=1, tp_size=1, tp_rank=0, pp_size=1, dp_size=1,
                          dp_rank=0)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer state 'exp_avg' of o\.weight: "
                       r"shaped \['\(3, 4\)', '\(5,\)'\], neither a scalar nor like"):
        reshard.resliced_payload(files, ctx, stage, stage.optimizer, LAYOUTS)
    small = _Stage({**full, "o.weight": full["o.weight"][:, :6]}, 1, 0)  # another model shape
    other = _synthetic_checkpoint(tmp_path / "b", full, 2, 2)
    files = reshard.RankFiles(other, json.loads((other / "manifest.json").read_text()))
    with pytest.raises(ckpt.CheckpointError, match=r"o\.weight: the checkpoint's tensor has full "
                       r"shape \(6, 8\), this model's TP rank 0 holds \(6, 6\)"):
        reshard.resliced_payload(files, ctx, small, small.optimizer, LAYOUTS)


def test_optimizer_state_of_files_without_param_names_is_named_by_the_grouping_rule(tmp_path):
    from megatron_latentcot.training import reshard

    model = {"a.weight": torch.ones(2), "a._extra_state": None, "norm.weight": torch.ones(3),
             "b.weight": torch.ones(4)}
    groups = [{"weight_decay": 0.1, "params": [0, 1]}, {"weight_decay": 0.0, "params": [2]}]
    payload = {"model": model, "optimizer": {"state": {2: {"step": 1}}, "param_groups": groups}}
    states, hyper = reshard.optimizer_by_name(payload, tmp_path, lambda n: n.startswith("norm"))
    assert states == {"norm.weight": {"step": 1}}
    assert hyper["a.weight"]["weight_decay"] == 0.1 and hyper["norm.weight"]["weight_decay"] == 0.0
    with pytest.raises(ckpt.CheckpointError, match=r"param_groups hold \[2, 1\] parameters, the "
                       r"model \[3\]: cannot tell which state is whose"):
        reshard.optimizer_by_name(payload, tmp_path, lambda n: False)


# -- one run per directory (RunLock) ------------------------------------------------------------
def _write_lock(root: Path, **holder) -> Path:
    path = root / ckpt.LOCK
    path.write_text(json.dumps({"started": "2025-01-01T00:00:00", **holder}))
    return path


def test_run_lock_refuses_a_live_holder_and_takes_over_after_its_process_ends(tmp_path):
    import socket
    import sys

    host, logs = socket.gethostname(), []
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _write_lock(tmp_path, host=host, pid=live.pid,
                           proc_start=ckpt._proc_start(live.pid))
        with pytest.raises(ckpt.CheckpointError, match=rf"^in use by another run \(host {host}, "
                           rf"pid {live.pid}, started 2025-01-01T00:00:00; lock file {lock}\)"):
            ckpt.RunLock(tmp_path).acquire(logs.append)
        # the same pid, now another process (a reused pid): stale
        _write_lock(tmp_path, host=host, pid=live.pid, proc_start="1")
        first = ckpt.RunLock(tmp_path)
        first.acquire(logs.append)
        assert logs == [f"took over the stale lock {lock} (host {host}, pid {live.pid}, started "
                        f"2025-01-01T00:00:00): its process {live.pid} has ended"]
        first.release()
        assert not lock.exists()
    finally:
        live.kill()
        live.wait()
    _write_lock(tmp_path, host=host, pid=live.pid)  # SIGKILLed: gone
    mine = ckpt.RunLock(tmp_path)
    mine.acquire(logs.append)
    assert json.loads(lock.read_text())["pid"] == os.getpid() and "has ended" in logs[-1]
    again = ckpt.RunLock(tmp_path)  # a later Trainer of this process: handed over
    again.acquire(logs.append)
    assert len(logs) == 2 and ckpt.RunLock.held[lock] is again
    mine.release()  # no longer its lock: stays
    assert lock.exists()
    again.release()
    assert not lock.exists() and not ckpt.RunLock.held


def test_run_lock_of_another_host_is_judged_by_its_heartbeat(tmp_path):
    import threading

    lock, logs = _write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=0), []
    stop = threading.Event()

    def beat() -> None:  # the other host's run, alive
        n = 0
        while not stop.wait(0.02):
            n += 1
            tmp = tmp_path / "beat.tmp"
            tmp.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "s", "heartbeat": n}))
            os.replace(tmp, lock)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(ckpt.CheckpointError, match="in use by another run .host elsewhere"):
            ckpt.RunLock(tmp_path, heartbeat_s=0.2).acquire(logs.append)
    finally:
        stop.set()
        thread.join()
    assert "watching its heartbeat for 0.5 s" in logs[0]
    mine = ckpt.RunLock(tmp_path, heartbeat_s=0.4)  # the heartbeat has stopped: stale
    mine.acquire(logs.append)
    assert logs[-1].endswith("its heartbeat has not changed for 1 s"), logs
    first = json.loads(lock.read_text())
    time.sleep(1.0)
    assert json.loads(lock.read_text())["heartbeat"] > first["heartbeat"] == 0  # its own beats
    mine.release()
    assert not lock.exists()


def test_a_manifest_from_before_new_fields_shows_no_config_difference():
    """Fields and sections added to the config after a run was saved (here ``mor`` and
    ``latent.jacobi_iterations``) take their defaults, so resuming that run is not refused as
    "checkpoints of another run"; a real difference still shows."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.training.checkpoint import config_diff, saved_config

    now = load_config(None, ["latent.method=adaptive"]).to_dict()
    old = {sec: dict(fields) for sec, fields in now.items() if sec != "mor"}
    del old["latent"]["jacobi_iterations"]
    assert config_diff(old, now)  # compared as saved, the new fields look like changes
    assert config_diff(saved_config({"config": old}), now) == []
    old["train"]["lr"] = now["train"]["lr"] * 2
    assert config_diff(saved_config({"config": old}), now) == [
        f"train.lr: {old['train']['lr']!r} -> {now['train']['lr']!r}"]
