"""Faults during training, done for real: NaN/inf injected into weights, gradients and losses,
a full tmpfs under a running job, SIGTERM/SIGUSR1 to one rank of two, a rank that skips a
collective, a launch without MASTER_ADDR, an output directory of another run, and SIGKILLs at
random points (the chaos harness, small)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from tests.dist_utils import run_distributed
from tests.test_training import TINY, data_overrides, sotu_data  # noqa: F401  (fixture)

ITERS = 6


# -- Trainer-level scenarios, all in one spawned process (one import of megatron-core) -----------
def _scenarios(data: dict[str, str], tmp: str, full_disk: str | None) -> dict[str, Any]:
    import torch

    from megatron_latentcot.config import load_config
    from megatron_latentcot.parallel import LaunchError, destroy_distributed, init_distributed
    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.training.faults import TrainingHalted
    from megatron_latentcot.training.loop import Trainer

    base = TINY + data_overrides(data) + [f"train.train_iters={ITERS}", "train.log_interval=1",
                                          "train.eval_iters=0"]
    ctx = init_distributed(load_config(None, base).parallel)
    root = Path(tmp)
    out: dict[str, Any] = {}

    def trainer(*extra: str) -> Trainer:
        return Trainer(load_config(None, base + list(extra)), ctx)

    def snapshot(t: Trainer) -> dict[str, torch.Tensor]:
        sd = {f"p.{k}": v.detach().clone() for k, v in t.engine.model.named_parameters()}
        for i, st in enumerate(t.engine.optimizer.optimizer.state.values()):
            sd.update({f"o{i}.{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)})
        return sd

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def scenario(name: str):
        def wrap(fn):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    out[name] = fn() or {}
            except BaseException:
                out[name] = {"unexpected": traceback.format_exc()}
            out[name]["stderr"] = err.getvalue()
            return fn
        return wrap

    def poisoned_step(t: Trainer, at: int, poison) -> dict[str, Any]:
        """Call ``poison(t)`` before the optimizer step of iteration ``at`` (1-based); record
        whether that step changed any parameter or optimizer state."""
        info: dict[str, Any] = {}
        opt, orig = t.engine.optimizer, t.engine.optimizer.step

        def step(lr):
            if t.state.iteration + 1 != at:
                return orig(lr)
            poison(t)
            before = snapshot(t)
            res = orig(lr)
            info["unchanged"] = same(before, snapshot(t))
            return res
        opt.step = step
        return info

    @scenario("nan_gradient")
    def _():
        t = trainer(f"train.save={root / 'nan_grad'}")
        info = poisoned_step(t, 3, lambda t: next(iter(t.engine.optimizer.params.values()))
                             .grad.view(-1)[0].fill_(math.nan))
        res = t.train()
        return dict(info, losses=res["losses"], skipped=res["skipped_iterations"],
                    log=(root / "nan_grad" / "metrics.jsonl").read_text())

    @scenario("inf_loss")
    def _():
        t = trainer()
        orig_run, orig_step, stepped = t.engine.run, t.engine.optimizer.step, []

        def run(mbs, forward_only):
            stats = orig_run(mbs, forward_only)
            if not forward_only and t.state.iteration + 1 == 2:
                stats[0]["lm_loss"] = math.inf  # the loss only: gradients stay finite
            return stats

        def step(lr):
            stepped.append(t.state.iteration + 1)
            return orig_step(lr)
        t.engine.run, t.engine.optimizer.step = run, step
        res = t.train()
        return {"losses": res["losses"], "skipped": res["skipped_iterations"], "stepped": stepped}

    @scenario("nan_forever")
    def _():
        t = trainer("train.max_skipped_in_a_row=3", "train.train_iters=20")
        orig_run = t.engine.run

        def run(mbs, forward_only):
            if t.state.iteration + 1 == 4:
                with torch.no_grad():
                    t.engine.model.norm.weight.fill_(math.nan)  # poison a weight for good
            return orig_run(mbs, forward_only)
        t.engine.run = run
        try:
            t.train()
        except TrainingHalted as e:
            return {"halted": str(e), "iteration": t.state.iteration}
        return {"halted": None}

    @scenario("loss_spike")
    def _():
        t = trainer(f"train.save={root / 'spike'}", "train.loss_spike_factor=1.5",
                    "train.loss_spike_window=4")
        orig_run = t.engine.run

        def run(mbs, forward_only):
            if t.state.iteration + 1 == 6:
                with torch.no_grad():
                    t.engine.model.lm_head.weight.mul_(200.0)
            return orig_run(mbs, forward_only)
        t.engine.run = run
        res = t.train()
        return {"losses": res["losses"], "log": (root / "spike" / "metrics.jsonl").read_text()}

    def quiet(fn):  # (stdout, fn())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            value = fn()
        return out.getvalue(), value

    @scenario("output_dir")
    def _():
        a = root / "run_a"
        trainer(f"train.save={a}", "train.train_iters=2").train()
        got: dict[str, Any] = {}
        try:
            trainer(f"train.save={a}", "train.lr=1e-3")
        except LaunchError as e:
            got["refused"] = str(e)
        t = trainer(f"train.save={a}", f"train.load={a}", "train.lr=1e-3")  # on purpose
        got["resumed_at"] = t.state.iteration
        # the same command again: resumes; the run is complete, so it only says so
        got["rerun"], got["rerun_result"] = quiet(
            lambda: trainer(f"train.save={a}", "train.train_iters=2").train())
        try:
            trainer(f"train.save={root / 'b'}", f"train.load={a}", "model.hidden_size=32",
                    "model.ffn_hidden_size=96")
        except ckpt.CheckpointError as e:
            got["other_model"] = str(e)
        rank_file = a / "iter_0000002" / "rank_00000.pt"
        data = bytearray(rank_file.read_bytes())
        data[len(data) // 3] ^= 0xFF
        rank_file.write_bytes(bytes(data))
        try:
            trainer(f"train.save={a}", f"train.load={a}")
        except ckpt.CheckpointError as e:
            got["corrupt"] = str(e)
        (root / "a_file").write_text("")
        try:
            trainer(f"train.save={root / 'a_file' / 'ckpt'}")
        except ckpt.CheckpointError as e:
            got["unwritable"] = str(e)
        return got

    @scenario("rerun")
    def _():
        """An unfinished run (``latest`` at iteration 2 of 4, as a kill leaves it) rerun by the
        same command goes on from it; train.overwrite=true starts from scratch."""
        b, cmd = root / "run_b", ("train.train_iters=4", "train.save_interval=2")
        straight = trainer(f"train.save={b}", *cmd).train()["losses"]
        (b / "latest").write_text("iter_0000002\n")
        log, t = quiet(lambda: trainer(f"train.save={b}", *cmd))
        got: dict[str, Any] = {"log": log, "resumed_at": t.state.iteration, "straight": straight,
                               "losses": t.train()["losses"]}
        got["metrics"] = (b / "metrics.jsonl").read_text()
        # a requeue of a command that initialises from another run: train.save's progress wins
        init = f"train.load={root / 'pretrained'}"  # (never read)
        got["init_log"], t = quiet(lambda: trainer(f"train.save={b}", init, *cmd))
        got["init_at"] = t.state.iteration
        t = trainer(f"train.save={b}", *cmd, "train.lr=1e-3", "train.overwrite=true")
        got.update(overwritten_at=t.state.iteration, left=ckpt.list_checkpoints(b),
                   metrics_after_overwrite=(b / "metrics.jsonl").read_text())
        return got

    @scenario("lock")
    def _():
        """A run whose train.save is locked by a live process is refused; a lock whose
        process has ended (SIGKILL) is taken over, and released when training ends."""
        import socket

        c, got = root / "run_c", {}
        c.mkdir()
        lock = c / "run.lock"
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                    "started": "2025-01-01T00:00:00"}))  # the live test process
        try:
            trainer(f"train.save={c}", "train.train_iters=1")
        except LaunchError as e:
            got["refused"] = str(e)
        dead = subprocess.Popen(["true"])
        dead.wait()
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                    "started": "2025-01-01T00:00:00"}))
        t = trainer(f"train.save={c}", "train.train_iters=1")
        got.update(dead=dead.pid, holder=json.loads(lock.read_text())["pid"], me=os.getpid())
        t.train()
        got["released"] = not lock.exists()
        return got

    @scenario("final_save_fails")
    def _():
        os.environ["MLC_FAULT"] = "save:before_rename=oserror"  # every save fails
        try:
            res = trainer(f"train.save={root / 'unsaved'}", "train.train_iters=2",
                          "train.continue_on_save_error=true").train()
        finally:
            del os.environ["MLC_FAULT"]
        return {"exit_code": res["exit_code"], "iteration": res["iteration"]}

    if full_disk:
        @scenario("full_disk_stop")
        def _():
            save = Path(full_disk) / "stop"
            t = trainer(f"train.save={save}", "train.save_interval=2")
            try:
                t.train()
                got = {"error": None}
            except ckpt.CheckpointError as e:
                got = {"error": str(e)}
            got.update(iteration=t.state.iteration, latest=ckpt.latest_checkpoint(save).name,
                       problems=ckpt.verify_checkpoint(save / "iter_0000002"),
                       leftovers=sorted(p.name for p in save.glob(".iter_*")))
            shutil.rmtree(save)
            return got

        @scenario("full_disk_continue")
        def _():
            save = Path(full_disk) / "go_on"
            res = trainer(f"train.save={save}", "train.save_interval=2",
                          "train.continue_on_save_error=true").train()
            return {"iterations": res["iteration"], "latest": ckpt.latest_checkpoint(save).name,
                    "exit_code": res["exit_code"]}

    destroy_distributed()
    return out


class _Background:
    """``fn(*args)`` in a thread, so a spawned single-process job overlaps another test's."""

    def __init__(self, fn, *args: Any):
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn, *args: Any) -> None:
        try:
            self.value = fn(*args)
        except BaseException as e:
            self.error = e

    def result(self, timeout: float = 600) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("background job still running")
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture(scope="module")
def scenarios_started(sotu_data, tmp_path_factory):  # noqa: F811
    """Starts the Trainer-level scenarios (one spawned process) in the background."""
    tmp = tmp_path_factory.mktemp("scenarios")
    mnt = tmp / "tmpfs"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(mnt)],  # one 7.4 MB checkpoint
        capture_output=True).returncode == 0
    job = _Background(run_distributed, _scenarios, 1, sotu_data, str(tmp),
                      str(mnt) if mounted else None)
    try:
        yield job
    finally:
        job.thread.join(600)
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def scenarios(scenarios_started) -> dict[str, Any]:
    return scenarios_started.result()[0]


# -- chaos: SIGKILL at random points, restart, exact losses ----------------------------------
def _check_chaos(result: dict[str, Any], kills: int) -> None:
    assert result["kills"] == kills, result
    assert result["corrupt_checkpoints"] == 0, result
    assert result["resumes"] == result["resumes_from_latest"] >= kills - 1, result
    assert result["survivors_hung"] == 0, result
    assert not result["iterations_missing"] and not result["mismatched_iterations"], result
    assert result["final_loss_diff"] == 0.0 and result["max_abs_loss_diff"] == 0.0, result
    assert result["valid_loss_diff"] == 0.0 and result["final_weights_equal"], result


def test_chaos_kills_inside_and_outside_saves_resume_exactly(sotu_data, tmp_path,  # noqa: F811
                                                            scenarios_started):
    """First in the file: its single-process launches overlap the scenarios' process."""
    from benchmarks.chaos import run_chaos

    result = run_chaos(sotu_data, tmp_path, world=1, kills=2, iters=10, save_interval=3, seed=1,
                       log=lambda s: None)
    _check_chaos(result, 2)
    assert result["kills_inside_save"] == 1


@pytest.mark.slow
def test_chaos_two_processes(sotu_data, tmp_path):  # noqa: F811
    from benchmarks.chaos import run_chaos

    result = run_chaos(sotu_data, tmp_path, world=2, kills=3, iters=12, save_interval=3, seed=2,
                       log=print)
    _check_chaos(result, 3)


def _get(scenarios: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in scenarios:
        pytest.skip(f"{name}: needs root with CAP_SYS_ADMIN to mount a tmpfs")
    got = scenarios[name]
    assert "unexpected" not in got, got["unexpected"] + got["stderr"]
    return got


def _records(log: str, split: str) -> list[dict]:
    return [r for r in map(json.loads, log.splitlines()) if r["split"] == split]


def test_nan_gradient_skips_the_update_and_training_goes_on(scenarios):
    got = _get(scenarios, "nan_gradient")
    assert got["unchanged"] is True  # no parameter and no Adam moment moved
    assert got["skipped"] == 1 and len(got["losses"]) == ITERS
    assert all(math.isfinite(v) for v in got["losses"])
    assert "iter 3: non-finite gradient norm" in got["stderr"]
    assert "batch = train samples [16, 24)" in got["stderr"]
    (rec,) = _records(got["log"], "skipped")
    assert rec["iteration"] == 3 and rec["first_sample"] == 16 and rec["end_sample"] == 24


def test_inf_loss_with_finite_gradients_skips_the_update(scenarios):
    got = _get(scenarios, "inf_loss")
    assert got["skipped"] == 1 and got["losses"][1] == math.inf
    assert got["stepped"] == [1, 3, 4, 5, 6]  # no optimizer step at iteration 2
    assert "iter 2: non-finite loss (loss inf" in got["stderr"]


def test_nonfinite_iterations_in_a_row_stop_training(scenarios):
    got = _get(scenarios, "nan_forever")
    assert got["halted"] is not None and got["iteration"] == 6
    assert "stopping at iteration 6: 3 iterations in a row (4..6) had a non-finite" in got["halted"]


def test_loss_spike_logs_the_batch(scenarios):
    got = _get(scenarios, "loss_spike")
    assert got["losses"][5] > 1.5 * sum(got["losses"][1:5]) / 4
    first = _records(got["log"], "loss_spike")[0]
    assert first["iteration"] == 6 and (first["first_sample"], first["end_sample"]) == (40, 48)
    assert "iter 6: loss spike" in got["stderr"]


def test_output_dir_of_another_run_and_bad_checkpoints_are_refused(scenarios):
    got = _get(scenarios, "output_dir")
    assert "holds checkpoints of another run (iter_0000002" in got["refused"]
    assert "train.lr: 0.003 -> 0.001" in got["refused"] and "Set train.load=" in got["refused"]
    assert got["resumed_at"] == 2
    assert "holds checkpoints of this run (same config, newest iter_0000002): resuming" \
        in got["rerun"], got["rerun"]
    assert "already complete: iter_0000002 is iteration 2 of train.train_iters=2" in got["rerun"]
    res = got["rerun_result"]  # nothing trained, evaluated or saved again
    assert res["exit_code"] == 0 and res["losses"] == [] and "valid_loss" not in res, res
    assert "saved with a different model (model.ffn_hidden_size: 160 -> 96; " \
           "model.hidden_size: 64 -> 32)" in got["other_model"]
    assert "rank_00000.pt: checksum mismatch" in got["corrupt"]
    assert "is not writable" in got["unwritable"]


def test_rerun_of_the_same_command_resumes_and_overwrite_starts_afresh(scenarios):
    got = _get(scenarios, "rerun")
    assert got["resumed_at"] == 2 and "resuming from them" in got["log"], got["log"]
    assert got["losses"] == got["straight"][2:]  # went on exactly where the checkpoint stood
    train = [r["iteration"] for r in _records(got["metrics"], "train")]
    assert train == [1, 2, 3, 4], train  # iterations 3 and 4 of the first attempt: dropped
    assert got["init_at"] == 4 and "resuming from them, not from train.load=" in got["init_log"]
    assert got["overwritten_at"] == 0 and got["left"] == [] and got["metrics_after_overwrite"] == ""
    assert "train.overwrite=true: deleted the 2 checkpoint(s) in train.save=" in got["stderr"]


def test_a_directory_in_use_is_refused_and_a_stale_lock_taken_over(scenarios):
    got = _get(scenarios, "lock")
    assert "run_c: in use by another run (host " in got["refused"], got["refused"]
    assert f"pid {os.getpid()}, started 2025-01-01T00:00:00; lock file " in got["refused"]
    assert len(got["refused"].splitlines()) == 1
    assert "took over the stale lock" in got["stderr"] and \
        f"its process {got['dead']} has ended" in got["stderr"], got["stderr"]
    assert got["holder"] == got["me"] and got["released"]


def test_a_failed_final_save_does_not_exit_0(scenarios):
    from megatron_latentcot.training.faults import EXIT_FAILURE

    got = _get(scenarios, "final_save_fails")
    assert got["iteration"] == 2 and got["exit_code"] == EXIT_FAILURE, got
    assert "ERROR: training reached iteration 2 but its final checkpoint was not saved " \
           "(train.continue_on_save_error=true); last good checkpoint: none" in got["stderr"]


def test_full_disk_stops_training_with_previous_checkpoint_intact(scenarios):
    got = _get(scenarios, "full_disk_stop")
    assert got["error"] is not None and got["iteration"] == 4
    assert "checkpoint at iteration 4 failed" in got["error"]
    assert "No space left on device" in got["error"] and "Training stopped" in got["error"]
    assert got["latest"] == "iter_0000002" and got["problems"] == [] and got["leftovers"] == []


def test_full_disk_can_continue_unsaved_with_a_warning_per_interval(scenarios):
    from megatron_latentcot.training.faults import EXIT_FAILURE

    got = _get(scenarios, "full_disk_continue")
    assert got["iterations"] == ITERS and got["latest"] == "iter_0000002"
    assert got["exit_code"] == EXIT_FAILURE  # its final checkpoint was not saved
    warnings = [line for line in got["stderr"].splitlines() if "training continues UNSAVED" in line]
    assert len(warnings) == 2  # iterations 4 and 6
    assert "checkpoint at iteration 4 failed" in warnings[0]


# -- launch errors (no process group is started) -----------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST",
                "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_launch_errors(clean_env):
    from megatron_latentcot.config import ConfigError, ParallelConfig
    from megatron_latentcot.parallel import LaunchError, init_distributed

    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT must be set"):
        init_distributed(ParallelConfig())
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT must be set"):
        init_distributed(ParallelConfig())
    clean_env.setenv("MASTER_PORT", "1")
    clean_env.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="LOCAL_RANK .* is not set"):
        init_distributed(ParallelConfig(backend="nccl"))
    clean_env.delenv("WORLD_SIZE")
    with pytest.raises(LaunchError, match="RANK/SLURM_PROCID is set but WORLD_SIZE/SLURM_NTASKS"):
        init_distributed(ParallelConfig())
    clean_env.delenv("RANK")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(LaunchError, match="WORLD_SIZE/SLURM_NTASKS is set but RANK/SLURM_PROCID"):
        init_distributed(ParallelConfig())
    clean_env.setenv("SLURM_PROCID", "two")
    with pytest.raises(LaunchError, match="not an integer"):
        init_distributed(ParallelConfig())


def test_world_of_one_leaves_the_launch_environment_alone(clean_env):
    """A plain process starts its group on an in-process store: nothing it sets (a port it
    holds) can leak into the processes it launches."""
    from megatron_latentcot.config import ParallelConfig
    from megatron_latentcot.parallel import destroy_distributed, init_distributed

    before = dict(os.environ)
    ctx = init_distributed(ParallelConfig())
    try:
        assert (ctx.rank, ctx.world_size) == (0, 1)
        assert dict(os.environ) == before
    finally:
        destroy_distributed()


# -- hung collectives ---------------------------------------------------------------------------
def _file_barrier(directory: str, rank: int, world: int) -> None:
    """Line the ranks up before a short-timeout rendezvous (imports take uneven time)."""
    Path(directory).mkdir(exist_ok=True)
    Path(directory, f"ready{rank}").touch()
    while not all(Path(directory, f"ready{r}").exists() for r in range(world)):
        time.sleep(0.05)


def _skip_a_collective(data: dict[str, str], tmp: str) -> dict[str, Any]:
    from megatron_latentcot.config import load_config
    from megatron_latentcot.training.faults import CollectiveError
    from megatron_latentcot.training.loop import Trainer

    rank = int(os.environ["RANK"])
    cfg = load_config(None, TINY + data_overrides(data) + [
        "train.train_iters=3", "train.eval_iters=0", "parallel.zero=none",
        "parallel.timeout_minutes=0.1"])  # 6 s
    _file_barrier(tmp, rank, 2)
    t = Trainer(cfg)
    _file_barrier(f"{tmp}/2", rank, 2)
    if rank == 1:  # rank 1 skips the gradient all-reduce of its optimizer step
        t.engine.optimizer.step = lambda lr: (0.0, True)
    start, out = time.monotonic(), {"error": None}
    try:
        t.train()
    except CollectiveError as e:
        out = {"error": str(e), "seconds": time.monotonic() - start}
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()  # no barrier: the peer is gone; exiting without it is slow
    return out


def test_a_rank_skipping_a_collective_times_out_naming_rank_and_operation(sotu_data, tmp_path):  # noqa: F811
    r0, r1 = run_distributed(_skip_a_collective, 2, sotu_data, str(tmp_path))
    assert r0["error"] and r1["error"], (r0, r1)
    assert r0["error"].startswith("rank 0 (tp 0, pp 0, dp 0): collective in 'optimizer step")
    assert r1["error"].startswith("rank 1 (tp 0, pp 0, dp 1): collective in 'preemption-flag")
    assert "parallel.timeout_minutes = 0.1, i.e. 6 s" in r0["error"]
    assert "Timed out" in r0["error"]
    assert r0["seconds"] < 60, r0


def test_hang_watchdog_ends_a_rank_stuck_without_an_error(tmp_path):
    """A hang that never raises (e.g. NCCL without async error handling) is ended too."""
    code = ("import time\nfrom megatron_latentcot.training.faults import CollectiveGuard\n"
            "g = CollectiveGuard(rank=1, world_size=2, timeout_s=0.5, grace_s=0.5)\n"
            "g.start()\nwith g.phase('pipeline recv'):\n    time.sleep(120)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    from megatron_latentcot.training.faults import EXIT_HUNG

    assert proc.returncode == EXIT_HUNG, proc.stderr
    assert "rank 1: no progress in 'pipeline recv'" in proc.stderr
    assert "time.sleep(120)" in proc.stderr or "line 6" in proc.stderr  # the stack dump
    assert time.monotonic() - start < 100


# -- preemption ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_preemption_signal_to_one_rank_saves_and_exits_for_requeue(sotu_data, tmp_path, sig):  # noqa: F811
    from benchmarks.chaos import Job
    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.training.faults import EXIT_REQUEUE

    save = tmp_path / "ckpt"
    job = Job(TINY + data_overrides(sotu_data) + [
        "train.train_iters=300", "train.log_interval=1", "train.eval_iters=0",
        f"train.save={save}"], world=2)
    try:
        assert job.wait_for(lambda r, line: line.startswith("iter      3/"), 300), job.output
        job.procs[1].send_signal(sig)  # rank 1 only: rank 0 must stop at the same iteration
        codes = job.wait(120)
    finally:
        for p in job.procs:
            if p.poll() is None:
                p.kill()
    msg = [line for line in job.output if "preempted by" in line]
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], job.output[-20:]
    assert msg and f"preempted by {sig.name} at iteration" in msg[0], job.output[-20:]
    it = int(msg[0].split("at iteration ")[1].split(":")[0])
    path = ckpt.latest_checkpoint(save)
    assert path.name == f"iter_{it:07d}" and ckpt.verify_checkpoint(path) == []
    assert 3 <= it < 300 and f"exiting with code {EXIT_REQUEUE} (requeue)" in msg[0]
