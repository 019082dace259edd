"""Pipeline memory against the number of micro-batches: GPipe vs 1F1B (issue #21).

Two gloo processes (PP2, one torch thread each) run one forward-backward (``Engine.run``) of
M = 2, 4, 8, 16 micro-batches of a model whose activations dominate the process' memory, for
vanilla (one pass, ``training/pipeline.py``) and adaptive (K = 3, tau = 0 so every token runs
every step: the planner's worst case; ``training/latent_pipeline.py``), under
``parallel.pipeline_schedule=gpipe`` (the old order) and ``1f1b`` (the bounded one). Per stage:

* ``rss_peak_mib``: the peak resident set during the call less the resident set before it
  (``/proc/self/clear_refs`` resets the high-water mark; glibc's mmap threshold is pinned so
  freed activations go back to the system);
* ``saved_peak_mib``: the peak bytes of distinct non-parameter storages autograd holds
  (saved-tensor hooks, :class:`LiveSaves`; a second, untimed run): the activations alone;
* ``planned_mib``: the planner's activation figure for that stage, schedule and M;
* ``s_per_iter``: the fastest of ``--repeats`` (default 3) hook-free calls, the two schedules
  alternating so both see the same machine load (``s_per_iter_all``: every call);
  ``bubble``: the schedule's simulated idle share (backward = 2 forwards).

    python -m benchmarks.pipeline [--quick] [--out PATH]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from collections import Counter
from typing import Any

import torch

MICRO = (2, 4, 8, 16)
METHODS = {"vanilla": [],
           "adaptive": ["latent.method=adaptive", "latent.max_steps=3", "latent.tau=0.0",
                        "model.embedding_multiplier=null"]}
SHAPE = dict(hidden=128, layers=4, heads=4, ffn=352, vocab=256, seq=128, rows=2)
QUICK_SHAPE = dict(hidden=64, layers=2, heads=4, ffn=160, vocab=256, seq=64, rows=2)


class LiveSaves:
    """Saved-tensor hooks: per (micro-batch, step) tag, the tensors autograd holds, and the
    bytes of the distinct non-parameter storages alive; peaks taken at every save. Set ``tag``
    before each unit's forward."""

    def __init__(self, params: set[int]):
        self.params, self.tag = params, (0, 0)
        self.count: Counter = Counter()
        self.storages: dict[int, list[int]] = {}  # data_ptr -> [boxes holding it, bytes]
        self.bytes = self.peak_bytes = self.peak_units = self.peak_mbs = 0

    def pack(self, t: torch.Tensor) -> Any:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params:
            return t
        entry = self.storages.setdefault(ptr, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
        entry[0] += 1
        self.count[self.tag] += 1
        alive = [u for u, c in self.count.items() if c > 0]
        self.peak_units = max(self.peak_units, len(alive))
        self.peak_mbs = max(self.peak_mbs, len({m for m, _ in alive}))
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return _Box(self, t.detach(), self.tag, ptr)  # (t itself: a cycle via grad_fn)

    def release(self, tag: Any, ptr: int) -> None:
        self.count[tag] -= 1
        entry = self.storages[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.storages[ptr]

    @staticmethod
    def unpack(box: Any) -> torch.Tensor:
        return box if isinstance(box, torch.Tensor) else box.t

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Box:
    """One saved tensor held by autograd; tells its counter when the graph lets it go."""

    def __init__(self, live: LiveSaves, t: torch.Tensor, tag: Any, ptr: int):
        self.live, self.t, self.tag, self.ptr = live, t, tag, ptr

    def __del__(self) -> None:
        self.live.release(self.tag, self.ptr)


def tag_units(live_of: Any) -> None:
    """Wrap both pipelines' unit forwards so ``live_of()`` (a LiveSaves or None) is tagged with
    (micro-batch, step) before each."""
    from megatron_latentcot.training import latent_pipeline, pipeline

    forward_unit, forward = latent_pipeline._forward_unit, pipeline._forward

    def tagged_unit(scheduler, links, ctx, st, k, grad):
        if live_of() is not None:
            live_of().tag = (id(st.mb), k)
        return forward_unit(scheduler, links, ctx, st, k, grad)

    def tagged(stage_forward, mb, *args):
        if live_of() is not None:
            live_of().tag = (id(mb), 1)
        return forward(stage_forward, mb, *args)

    latent_pipeline._forward_unit, pipeline._forward = tagged_unit, tagged


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(rank: int, port: int, shape: dict, quick: bool, repeats: int, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        torch.set_num_threads(1)
        from benchmarks.common import shape_overrides, synthetic_microbatch
        from megatron_latentcot import plan as P
        from megatron_latentcot.config import load_config
        from megatron_latentcot.parallel import destroy_distributed, init_distributed
        from megatron_latentcot.training import schedules
        from megatron_latentcot.training.loop import Engine

        live: list[LiveSaves | None] = [None]
        tag_units(lambda: live[0])
        rows, rowsd, ctx = shape["rows"], [], None
        for method, overrides in METHODS.items():
            for micro in MICRO[:2] if quick else MICRO:
                engines, cfgs = {}, {}
                for schedule in schedules.SCHEDULES:
                    cfgs[schedule] = load_config(None, shape_overrides(
                        shape["hidden"], shape["layers"], shape["heads"], shape["ffn"],
                        shape["vocab"], shape["seq"], rows, rows * micro) + overrides + [
                        "parallel.pipeline_model_parallel_size=2", "parallel.backend=gloo",
                        f"parallel.pipeline_schedule={schedule}"])
                    ctx = ctx or init_distributed(cfgs[schedule].parallel)
                    engines[schedule] = Engine(cfgs[schedule], ctx, shape["vocab"])
                mbs = [synthetic_microbatch(rows, shape["seq"], shape["vocab"], seed=i)
                       for i in range(micro)]
                times: dict[str, list[float]] = {s: [] for s in engines}
                rss: dict[str, float] = dict.fromkeys(engines, 0.0)
                for engine in engines.values():
                    engine.run(mbs[:2], forward_only=False)  # gradients allocated
                for _ in range(repeats):  # the schedules alternate: the same machine load
                    for schedule, engine in engines.items():
                        torch.distributed.barrier()
                        _reset_peak_rss()
                        before = _rss_kib("VmRSS")
                        t0 = time.perf_counter()
                        engine.run(mbs, forward_only=False)
                        times[schedule].append(time.perf_counter() - t0)
                        rss[schedule] = max(rss[schedule], (_rss_kib("VmHWM") - before) / 1024)
                for schedule, engine in engines.items():
                    torch.distributed.barrier()
                    live[0] = LiveSaves({p.untyped_storage().data_ptr()
                                         for p in engine.model.parameters()})
                    with live[0].hooks():
                        engine.run(mbs, forward_only=False)
                    saved, live[0] = live[0], None
                    cfg = cfgs[schedule]
                    mem = P.stage_memory(cfg, shape["vocab"], P.make_layout(cfg), ctx.pp_rank)
                    planned = next(v for k, v in mem.terms.items() if k.startswith("activations"))
                    rowsd.append({
                        "method": method, "schedule": schedule, "micro_batches": micro,
                        "stage": ctx.pp_rank, "rss_peak_mib": rss[schedule],
                        "saved_peak_mib": saved.peak_bytes / 2**20,
                        "planned_mib": planned / 2**20, "live_microbatches": saved.peak_mbs,
                        "live_units": saved.peak_units, "s_per_iter": min(times[schedule]),
                        "s_per_iter_all": times[schedule],
                        "bubble": schedules.simulate(schedule, 2, P.pipeline_units(cfg),
                                                     micro).bubble()})
                    if rank == 0:
                        print(f"  {method} {schedule} M={micro}: {times[schedule]}", flush=True)
                del engines, mbs
        destroy_distributed()
        queue.put((rank, "ok", pickle.dumps(rowsd)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def _flatness(rows: list[dict], key: str) -> dict[str, float]:
    """Per (method, schedule, stage): value at M = 16 over value at M = 4."""
    out = {}
    for r in rows:
        if r["micro_batches"] != 16:
            continue
        four = next(q for q in rows if q["micro_batches"] == 4 and all(
            q[f] == r[f] for f in ("method", "schedule", "stage")))
        out[f"{r['method']}/{r['schedule']}/stage{r['stage']}"] = r[key] / four[key]
    return out


def main() -> None:
    from benchmarks.common import base_parser, format_table, write_json

    p = base_parser(__doc__.splitlines()[0], "benchmarks/results/pipeline.json")
    p.add_argument("--timeout", type=float, default=900, help="seconds before giving up")
    args = p.parse_args()
    shape = QUICK_SHAPE if args.quick else SHAPE
    repeats = args.repeats or (1 if args.quick else 3)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave the resident set
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, port, shape, args.quick, repeats, queue))
             for r in (0, 1)]
    t0 = time.time()
    for proc in procs:
        proc.start()
    rows: list[dict] = []
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=args.timeout)
            if status != "ok":
                raise SystemExit(f"rank {rank} failed:\n{value}")
            rows += pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    rows.sort(key=lambda r: (r["method"], r["schedule"], r["stage"], r["micro_batches"]))
    for r in rows:
        r["planned_over_saved"] = r["planned_mib"] / r["saved_peak_mib"]
    cols = [("method", "method", ""), ("schedule", "schedule", ""), ("stage", "stage", ""),
            ("micro_batches", "M", ""), ("rss_peak_mib", "RSS peak MiB", ".1f"),
            ("saved_peak_mib", "saved MiB", ".1f"), ("planned_mib", "planned MiB", ".1f"),
            ("live_microbatches", "live mbs", ""), ("live_units", "live units", ""),
            ("s_per_iter", "s/iter", ".2f"), ("bubble", "bubble", ".3f")]
    print(format_table(rows, cols))
    payload: dict[str, Any] = {"shape": shape, "rows": rows, "wall_s": time.time() - t0}
    if not args.quick:
        payload["m16_over_m4"] = {"rss": _flatness(rows, "rss_peak_mib"),
                                  "saved": _flatness(rows, "saved_peak_mib")}
        payload["planned_over_saved_max_error"] = max(abs(r["planned_over_saved"] - 1)
                                                      for r in rows)
        print("M=16 / M=4:", payload["m16_over_m4"])
    path = write_json(args.out, "pipeline", torch.device("cpu"), args, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
