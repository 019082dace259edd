"""Chaos harness: SIGKILL a small multi-process training job at random points and check recovery.

``python -m benchmarks.chaos [--quick] [--kills 12] [--world 2] [--seed 0]``

A tiny Llama trains on real text (State of the Union addresses, sentencepiece BPE) with
``python -m megatron_latentcot.pretrain`` launched as ``world`` processes (RANK/WORLD_SIZE/
MASTER_* like torchrun; data parallel with FSDP2-sharded optimizer states when world > 1). The
harness kills it ``kills`` times and restarts it with ``train.load`` = ``train.save``:

- inside a save: ``$MLC_FAULT`` makes one rank pause at a named point of ``save_checkpoint``
  (before writing its file, after it, before the rename, before ``latest``, before pruning);
  the harness kills that rank while it waits there;
- at an iteration: a random delay after the log line of a random iteration;
- at a random time after launch (import, data loading, compute or a save).

One rank is SIGKILLed; the others must then exit on their own with an error (a failed
collective, or a rendezvous that times out after ``parallel.timeout_minutes`` when the kill
landed during start-up), else they count as hung and are killed too. After every kill the harness checks
that ``latest`` names a complete checkpoint whose files match their checksums, and that no
complete checkpoint is corrupt; every restart must resume exactly from ``latest``. At the end the
per-iteration losses (every attempt's, including recomputed iterations), the final validation
loss and the final weights must equal an uninterrupted run's bit for bit (CPU, gloo).

Writes ``benchmarks/results/chaos.json``; ``run_chaos`` is also what ``tests/test_reliability.py``
runs with 2 kills.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=160", "data.seq_length=64",
        "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3",
        "train.min_lr=3e-4", "train.lr_warmup_iters=3", "train.log_interval=1",
        "train.eval_iters=1", "train.eval_interval=0", "train.keep_last=2"]
SAVE_POINTS = ["save:before_latest", "save:after_rank_file", "save:before_rename",
               "save:before_prune", "save:start"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_data(workdir: Path, documents: int = 40) -> dict[str, str]:
    """Indexed train (first ``documents`` addresses) and validation sets + the tokenizer."""
    from megatron_latentcot.cli.preprocess_data import main as preprocess
    from megatron_latentcot.data.corpus import default_cache_dir, prepare_corpus
    from megatron_latentcot.data.tokenizer_training import train_sentencepiece

    cache = default_cache_dir()
    corpus = prepare_corpus(cache)
    tokenizer = cache / "tokenizers" / "sotu_bpe4096.model"
    if not tokenizer.is_file():
        tokenizer = Path(train_sentencepiece([corpus.train], tokenizer.with_suffix(""),
                                             vocab_size=4096, model_type="bpe"))
    workdir.mkdir(parents=True, exist_ok=True)
    subset = workdir / "train.jsonl"
    subset.write_text("\n".join(Path(corpus.train).read_text().splitlines()[:documents]) + "\n")
    paths = {}
    for name, src in (("train", subset), ("valid", Path(corpus.valid))):
        prefix = workdir / name
        if not Path(f"{prefix}_text_document.idx").is_file():
            assert preprocess(["--input", str(src), "--output-prefix", str(prefix),
                               "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                               str(tokenizer), "--append-eod", "--workers", "1"]) == 0
        paths[name] = f"{prefix}_text_document"
    paths["tokenizer"] = str(tokenizer)
    return paths


def job_overrides(data: dict[str, str], save: Path, iters: int, save_interval: int,
                  load: bool) -> list[str]:
    out = TINY + [f"data.data_path=[{data['train']}]", f"data.valid_path={data['valid']}",
                  f"data.tokenizer_model={data['tokenizer']}", f"train.train_iters={iters}",
                  f"train.save={save}", f"train.save_interval={save_interval}",
                  "parallel.timeout_minutes=1.0"]
    return out + ([f"train.load={save}"] if load else [])


class Job:
    """``world`` processes of ``python -m megatron_latentcot.pretrain``; lines to a queue."""

    def __init__(self, overrides: list[str], world: int, fault: str | None = None):
        port = _free_port()
        self.lines: queue.Queue[tuple[int, str]] = queue.Queue()
        self.output: list[str] = []
        self.resumed_at: int | None = None  # from the "resumed from" / "no checkpoint" line
        self.procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
            env.pop("MLC_FAULT", None)
            if fault:
                env["MLC_FAULT"] = fault
            p = subprocess.Popen([sys.executable, "-m", "megatron_latentcot.pretrain", *overrides],
                                 cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
            threading.Thread(target=self._read, args=(rank, p), daemon=True).start()
            self.procs.append(p)
        self.started = time.monotonic()

    def _read(self, rank: int, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            self.lines.put((rank, line.rstrip("\n")))
        self.lines.put((rank, "\0EOF"))

    def next_line(self, timeout: float) -> tuple[int, str] | None:
        """The next output line of any rank; None on timeout or once every rank has ended."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                rank, line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line == "\0EOF":
                if all(p.poll() is not None for p in self.procs) and self.lines.empty():
                    return None
                continue
            self.output.append(f"[{rank}] {line}")
            if line.startswith("resumed from "):
                self.resumed_at = int(line.rsplit(" ", 1)[1])
            elif line.startswith("no checkpoint in "):
                self.resumed_at = 0
            return rank, line

    def wait_for(self, match: Callable[[int, str], bool], timeout: float) -> tuple[int, str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.next_line(deadline - time.monotonic())
            if got is None:
                if all(p.poll() is not None for p in self.procs):
                    return None
                continue
            if match(*got):
                return got
        return None

    def kill(self, victim: int, survivor_timeout: float) -> dict[str, Any]:
        """SIGKILL ``victim``; the others must exit on their own within ``survivor_timeout``."""
        self.procs[victim].send_signal(signal.SIGKILL)
        self.procs[victim].wait()
        deadline = time.monotonic() + survivor_timeout
        codes, hung = {}, []
        for rank, p in enumerate(self.procs):
            if rank == victim:
                continue
            try:
                codes[rank] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung.append(rank)
                p.kill()
                p.wait()
        seconds = survivor_timeout - max(0.0, deadline - time.monotonic())
        self.drain()
        last = {r: next((line[len(f"[{r}] "):] for line in reversed(self.output)
                         if line.startswith(f"[{r}] ")), "")[:300] for r in codes}
        return {"victim": victim, "survivor_exit_codes": codes, "survivors_hung": hung,
                "survivor_seconds": round(seconds, 1), "survivor_last_lines": last}

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.drain()
        return [p.returncode for p in self.procs]

    def drain(self) -> None:
        while self.next_line(0.2) is not None:
            pass


def _iteration(line: str) -> int:
    """The iteration of a training log line ("iter     12/40 | ..."), else -1."""
    if not line.startswith("iter "):
        return -1
    try:
        return int(line[5:].split("/", 1)[0])
    except ValueError:
        return -1


def read_losses(metrics: Path) -> tuple[dict[int, list[float]], float | None, int]:
    """{iteration: [lm_loss of every attempt]}, the last validation loss, unreadable lines."""
    losses: dict[int, list[float]] = {}
    valid, bad = None, 0
    if not metrics.is_file():
        return losses, valid, bad
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # a line cut by SIGKILL
            continue
        if rec.get("split") == "train" and "lm_loss" in rec:
            losses.setdefault(rec["iteration"], []).append(rec["lm_loss"])
        elif rec.get("split") == "valid":
            valid = rec["loss"]
    return losses, valid, bad


def inspect_checkpoints(save: Path) -> dict[str, Any]:
    """``latest``, its iteration, and every complete checkpoint's integrity."""
    from megatron_latentcot.training import checkpoint as ckpt

    out: dict[str, Any] = {"latest": None, "iteration": 0, "latest_ok": True, "corrupt": [],
                           "complete": [], "leftovers": sorted(p.name for p in save.glob(".iter_*"))}
    try:
        path = ckpt.latest_checkpoint(save) if save.exists() else None
    except ckpt.CheckpointError as e:
        out.update(latest_ok=False, latest_error=str(e))
        path = None
    if path is not None:
        out["latest"] = path.name
        out["iteration"] = ckpt.read_manifest(path)["iteration"]
    for p in ckpt.list_checkpoints(save):
        problems = ckpt.verify_checkpoint(p)
        out["complete"].append(p.name)
        if problems:
            out["corrupt"].append({p.name: problems})
            if p.name == out["latest"]:
                out["latest_ok"] = False
    return out


def _rank_files_equal(a: Path, b: Path) -> bool:
    import torch

    for fa in sorted(a.glob("rank_*.pt")):
        ma = torch.load(fa, map_location="cpu", weights_only=False)["model"]
        mb = torch.load(b / fa.name, map_location="cpu", weights_only=False)["model"]
        if ma.keys() != mb.keys() or not all(
                not torch.is_tensor(ma[k]) or torch.equal(ma[k], mb[k]) for k in ma):
            return False
    return any(a.glob("rank_*.pt"))


@dataclass
class Plan:
    kind: str  # "save", "iter" or "time"
    point: str = ""
    rank: int = 0
    after_iters: int = 0
    delay: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)


def make_plan(kills: int, world: int, save_interval: int, startup_s: float,
              rng: random.Random) -> list[Plan]:
    n_save = max(1, (5 * kills) // 12) if kills > 1 else 0
    n_time = (kills - n_save) // 3
    plans = []
    for i in range(n_save):
        point = SAVE_POINTS[i % len(SAVE_POINTS)]
        rank = 0 if point in ("save:before_rename", "save:before_latest", "save:before_prune") \
            else rng.randrange(world)
        plans.append(Plan("save", point=point, rank=rank))
    for _ in range(n_time):
        plans.append(Plan("time", rank=rng.randrange(world), delay=rng.uniform(0.3, startup_s)))
    while len(plans) < kills:
        plans.append(Plan("iter", rank=rng.randrange(world),
                          after_iters=rng.randint(1, 2 * save_interval), delay=rng.uniform(0, 0.3)))
    rng.shuffle(plans)
    return plans


def run_chaos(data: dict[str, str], workdir: Path, world: int = 2, kills: int = 12,
              iters: int = 40, save_interval: int = 4, seed: int = 0,
              survivor_timeout: float = 240.0, job_timeout: float = 600.0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Reference run, then ``kills`` killed-and-restarted attempts and a final one; the figures."""
    rng = random.Random(seed)
    t_start = time.monotonic()
    ref_dir, run_dir = workdir / "reference", workdir / "chaos"
    for d in (ref_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    log(f"reference: {iters} iterations, {world} process(es), uninterrupted")
    ref = Job(job_overrides(data, ref_dir, iters, save_interval, load=False), world)
    first = ref.wait_for(lambda r, line: line.startswith("iter "), job_timeout)
    startup_s = time.monotonic() - ref.started if first else 10.0
    codes = ref.wait(job_timeout)
    if codes != [0] * world:
        raise RuntimeError(f"reference run failed {codes}:\n" + "\n".join(ref.output[-40:]))
    ref_logged, ref_valid, _ = read_losses(ref_dir / "metrics.jsonl")
    ref_losses = {i: vs[-1] for i, vs in ref_logged.items()}

    plans = make_plan(kills, world, save_interval, startup_s, rng)
    attempts, corrupt, resumes_ok, resumes, survivors_hung = [], 0, 0, 0, 0
    losses: dict[int, list[float]] = {}  # every attempt's losses, recomputed iterations included
    cut_lines = 0

    def collect(job: Job) -> None:
        """This attempt's rows: a resumed run keeps metrics.jsonl up to where it resumed and
        drops the rest, so what lies past that is this attempt's (and is gone next time)."""
        nonlocal cut_lines
        if job.resumed_at is None:  # killed before it loaded anything: it wrote nothing
            return
        logged, _, bad = read_losses(run_dir / "metrics.jsonl")
        cut_lines += bad
        for i, vs in logged.items():
            if i > job.resumed_at:
                losses.setdefault(i, []).extend(vs)
    expected_resume = 0
    for attempt, plan in enumerate([*plans, None]):
        fault = f"{plan.point}@{plan.rank}=sleep:600" if plan and plan.kind == "save" else None
        job = Job(job_overrides(data, run_dir, iters, save_interval, load=True), world, fault)
        rec: dict[str, Any] = {"attempt": attempt, "expected_resume": expected_resume}
        never: Callable[[int, str], bool] = lambda r, line: False
        if plan is None:
            codes = job.wait(job_timeout)
            rec.update(kind="final", exit_codes=codes)
        else:
            rec.update(kind=plan.kind, point=plan.point or None, victim=plan.rank)
            if plan.kind == "save":
                hit = job.wait_for(lambda r, line: line.startswith("[fault]"), job_timeout)
                rec["at"] = hit[1] if hit else None
            elif plan.kind == "iter":
                job.wait_for(lambda r, line, j=job: j.resumed_at is not None, job_timeout)
                resumed = job.resumed_at or 0
                target = min(resumed + plan.after_iters, iters - 4)
                if target > resumed:  # an iteration of this attempt to kill after
                    prefix = f"iter {target:>6d}/"
                    job.wait_for(lambda r, line, s=prefix: line.startswith(s), job_timeout)
                    time.sleep(plan.delay)
                    rec["at"] = f"iteration {target} + {plan.delay:.2f} s"
                else:  # resumed inside the last iterations (no line to wait for): kill now
                    rec["at"] = f"right after resuming at iteration {resumed}"
            else:  # a random time, but before the run can finish
                late = job.wait_for(lambda r, line: _iteration(line) >= iters - 4,
                                    plan.delay - (time.monotonic() - job.started))
                rec["at"] = (f"{time.monotonic() - job.started:.2f} s after launch"
                             + (" (near the end)" if late else ""))
        if job.resumed_at is None:
            job.wait_for(never, 0.5)  # collect what was printed before the kill
        if attempt > 0 and job.resumed_at is not None:  # else killed before loading
            resumes += 1
            resumes_ok += job.resumed_at == expected_resume
            if job.resumed_at != expected_resume:
                log(f"  attempt {attempt}: resumed at {job.resumed_at}, expected {expected_resume}")
        rec["observed_resume"] = job.resumed_at
        if plan is None:
            collect(job)
            attempts.append(rec)
            log(f"attempt {attempt}: final run exit codes {codes}")
            if codes != [0] * world:
                raise RuntimeError("final run failed:\n" + "\n".join(job.output[-40:]))
            break
        if any(p.poll() is not None for p in job.procs):  # ended before the kill landed
            codes = job.wait(job_timeout)
            collect(job)
            rec.update(kind="ended", exit_codes=codes)
            attempts.append(rec)
            log(f"attempt {attempt}: ended before its kill ({codes})")
            if codes == [0] * world:
                break
            raise RuntimeError(f"attempt {attempt} failed:\n" + "\n".join(job.output[-40:]))
        rec.update(job.kill(plan.rank, survivor_timeout))
        collect(job)
        survivors_hung += len(rec["survivors_hung"])
        state = inspect_checkpoints(run_dir)
        corrupt += len(state["corrupt"]) + (not state["latest_ok"])
        expected_resume = state["iteration"]
        rec.update(latest_after=state["latest"], complete=state["complete"],
                   corrupt=state["corrupt"], latest_ok=state["latest_ok"],
                   leftovers=state["leftovers"])
        attempts.append(rec)
        log(f"attempt {attempt}: killed rank {plan.rank} {plan.kind} {rec.get('at')}; latest "
            f"{state['latest']}, {len(state['complete'])} complete, {len(state['corrupt'])} corrupt"
            f", leftovers {state['leftovers']}, survivors {rec['survivor_exit_codes']}")

    _, valid, _ = read_losses(run_dir / "metrics.jsonl")
    diffs = [abs(v - ref_losses[i]) for i, vs in losses.items() for v in vs if i in ref_losses]
    mismatched = sorted(i for i, vs in losses.items() if any(v != ref_losses.get(i) for v in vs))
    final_ckpt = f"iter_{iters:07d}"
    kills_done = sum(1 for a in attempts if a["kind"] in ("save", "iter", "time"))
    return {
        "world_size": world, "iterations": iters, "save_interval": save_interval, "seed": seed,
        "kills_planned": kills, "kills": kills_done,
        "kills_inside_save": sum(1 for a in attempts if a["kind"] == "save"),
        "kill_points": sorted({a.get("point") or a["kind"] for a in attempts
                               if a["kind"] in ("save", "iter", "time")}),
        "resumes": resumes, "resumes_from_latest": resumes_ok,
        "corrupt_checkpoints": corrupt, "survivors_hung": survivors_hung,
        "iterations_logged": sum(len(v) for v in losses.values()),
        "iterations_recomputed": sum(len(v) - 1 for v in losses.values()),
        "iterations_missing": sorted(set(ref_losses) - set(losses)),
        "mismatched_iterations": mismatched,
        "max_abs_loss_diff": max(diffs) if diffs else None,
        "final_loss": losses.get(iters, [None])[-1], "reference_final_loss": ref_losses.get(iters),
        "final_loss_diff": (abs(losses[iters][-1] - ref_losses[iters])
                            if iters in losses and iters in ref_losses else None),
        "valid_loss_diff": abs(valid - ref_valid) if valid is not None and ref_valid is not None
        else None,
        "final_weights_equal": _rank_files_equal(ref_dir / final_ckpt, run_dir / final_ckpt),
        "metrics_lines_cut_by_kills": cut_lines,
        "wall_s": round(time.monotonic() - t_start, 1),
        "attempts": attempts,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 kills, 1 process, 16 iterations")
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--world", type=int, default=2, help="processes (data parallel)")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--save-interval", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/chaos.json")
    args = p.parse_args(argv)
    if args.quick:
        args.kills, args.world, args.iters = 3, 1, 16
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mlc_chaos_"))
    data = prepare_data(workdir / "data")
    result = run_chaos(data, workdir, world=args.world, kills=args.kills, iters=args.iters,
                       save_interval=args.save_interval, seed=args.seed)
    ok = (result["kills"] == result["kills_planned"] and result["corrupt_checkpoints"] == 0
          and not result["mismatched_iterations"]
          and result["resumes"] == result["resumes_from_latest"] and result["final_weights_equal"]
          and not result["iterations_missing"] and result["survivors_hung"] == 0)
    summary = {k: v for k, v in result.items() if k != "attempts"}
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "chaos", "passed": ok,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "command": "python -m benchmarks.chaos " + " ".join(argv or sys.argv[1:]),
        **result}, indent=1) + "\n")
    print(f"{'PASS' if ok else 'FAIL'}: wrote {args.out}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
