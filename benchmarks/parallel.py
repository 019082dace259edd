"""Parallel layouts on CPU/gloo: per-iteration time split into compute and communication by kind
(sequence-parallel regather, pipeline p2p, gradient reduce-scatter / all-reduce, ...), and the
bytes the regather moves against the activations compaction saves (issue #6).

Every layout trains the same model (adaptive latent CoT, K_max = 4, ``latent.tau=0.3`` so the
router prunes) on the same global batches through ``Engine.train_step`` (forward + backward +
optimizer), 4 gloo processes, one torch thread each:

* ``ref``       1 process (world of one, no communication at all): the reference,
* ``tp2sp_dp2`` TP2 + sequence parallelism x DP2 (FSDP2): the regather path,
* ``tp2_dp2``   TP2 without SP x DP2 (FSDP2): the same TP split, no regather (full mode only),
* ``pp2_dp2``   PP2 x DP2 (FSDP2): the latent loop through pipeline stages (p2p),
* ``tp2_pp2``   TP2 x PP2 (DP1),
* ``dp4``       DP4 (FSDP2): the "DP2" row grown to 4 processes (pure data parallelism).

Communication is measured by wrapping the torch.distributed collectives and p2p calls (and the
aliases megatron-core's tensor-parallel mappings bound at import, and its sequence-parallel
gather / reduce(-scatter) entry points our code calls): wall time inside each call (the
outermost one when calls nest; async calls: launch + ``wait()``) and bytes. Each call is
classified by who issued it: ``regather`` (inside ``LatentStepScheduler._regather``, plus the
backward of its differentiable gathers, tagged by autograd node hooks), ``latent_sync`` (the
other collectives of the SP latent loop: per-step live counts, the z^f all-reduce, ...), ``tp``
(megatron's TP/SP layers), ``p2p`` (pipeline send/recv), ``fsdp_all_gather`` /
``grad_reduce_scatter`` (FSDP2), ``grad_all_reduce`` (``Optimizer.finalize_grads``),
``metrics`` (grad norm, loss stats) and ``other``. compute = iteration wall - communication.

    python -m benchmarks.parallel [--quick] [--out PATH] [--rounds N] [--warmup N] [--repeats N]

The instrumentation (:class:`CommRecorder`) imports nothing from megatron-core, so it can be
tested without the 30 s import; the benchmark imports ``benchmarks.common`` (and with it
megatron-core) inside :func:`main` and the workers.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

# -- what one collective call moves -------------------------------------------------------------

GATHERS = ("all_gather_into_tensor", "_all_gather_base", "all_gather_single", "all_gather")
SCATTERS = ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single",
            "reduce_scatter")
P2P = ("send", "recv", "isend", "irecv")
TORCH_OPS = GATHERS + SCATTERS + ("all_reduce", "broadcast", "all_to_all_single") + P2P
# megatron-core's public SP/TP entry points our code calls (latent.py, llama.py): timed as the
# outermost call (their glue included); the bytes are counted by the torch calls inside.
MEGATRON_ENTRY_POINTS = ("gather_from_sequence_parallel_region",
                         "reduce_from_tensor_model_parallel_region",
                         "reduce_scatter_to_sequence_parallel_region")
CATEGORIES = ("regather", "latent_sync", "tp", "p2p", "fsdp_all_gather", "grad_reduce_scatter",
              "grad_all_reduce", "metrics", "other")


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _group_size(group: Any) -> int:
    try:
        return dist.get_world_size(group) if group is not None else dist.get_world_size()
    except (RuntimeError, ValueError):
        return 1


def payload_bytes(op: str, a: dict[str, Any]) -> tuple[int, int]:
    """(buffer bytes, wire bytes this rank sends) of one call, from its bound arguments.

    buffer: the gathered output / the reduce-scattered input / the all-reduced or sent tensor.
    wire: the ring-algorithm bytes this rank puts on the wire: all-gather and reduce-scatter
    (n-1)/n x buffer, all-reduce 2(n-1)/n x buffer, send = buffer, recv = 0 (its sender counts
    it), broadcast = buffer on the source. Summed over ranks, wire = the bytes on the network.
    """
    n = _group_size(a.get("group"))
    share = (n - 1) / n if n > 1 else 0.0
    if op in GATHERS:
        buf = _nbytes(a.get("output_tensor", a.get("tensor_list")))
        return buf, round(buf * share)
    if op in SCATTERS:
        buf = _nbytes(a.get("input", a.get("input_tensor", a.get("input_list"))))
        return buf, round(buf * share)
    if op == "all_reduce":
        buf = _nbytes(a.get("tensor"))
        return buf, round(2 * buf * share)
    if op == "all_to_all_single":
        buf = _nbytes(a.get("input"))
        return buf, round(buf * share)
    if op == "broadcast":
        buf = _nbytes(a.get("tensor"))
        if a.get("src") is not None:
            is_src = a["src"] == dist.get_rank()
        else:
            is_src = a.get("group_src") == dist.get_rank(a.get("group"))
        return buf, buf if is_src and n > 1 else 0
    if op in ("send", "isend"):
        buf = _nbytes(a.get("tensor"))
        return buf, buf
    if op in ("recv", "irecv"):
        return _nbytes(a.get("tensor")), 0
    return 0, 0


# -- the recorder -------------------------------------------------------------------------------

@dataclass
class Tally:
    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0  # buffer bytes (see payload_bytes)
    wire_bytes: int = 0  # bytes this rank sent (ring model)


class _TimedWork:
    """An async call's work handle whose ``wait()`` is timed into the call's category."""

    def __init__(self, work: Any, recorder: CommRecorder, key: tuple[str, str]):
        self._work, self._recorder, self._key = work, recorder, key

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            if self._recorder.active:
                self._recorder.tally(self._key).seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class CommRecorder:
    """Wraps torch.distributed (and megatron's aliases of it) to time and size communication.

    ``install()`` patches, ``uninstall()`` restores. Nothing is recorded unless ``active``;
    ``tallies`` maps (category, op) -> :class:`Tally` since the last ``reset()``.
    """

    def __init__(self) -> None:
        self.active = False
        self.tallies: dict[tuple[str, str], Tally] = {}
        self._tags: list[str] = []
        self._depth = 0  # nesting of wrapped calls: time counts at the outermost only
        self._bytes_depth = 0  # nesting of torch-level calls: bytes count at the outermost
        self._category = "other"
        self._patched: list[tuple[Any, str, Any]] = []

    # -- bookkeeping ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.tallies = {}

    def tally(self, key: tuple[str, str]) -> Tally:
        t = self.tallies.get(key)
        if t is None:
            t = self.tallies[key] = Tally()
        return t

    @contextlib.contextmanager
    def tag(self, category: str) -> Iterator[None]:
        """Calls inside are classified as ``category`` (the innermost tag wins)."""
        self._tags.append(category)
        try:
            yield
        finally:
            self._tags.pop()

    def classify(self, op: str) -> str:
        """The category of a call about to be made: a tag, else who is on the stack."""
        if self._tags:
            return self._tags[-1]
        seen_mappings = False
        frame = sys._getframe(2)
        while frame is not None:
            path, name = frame.f_code.co_filename.replace("\\", "/"), frame.f_code.co_name
            if "/torch/distributed/fsdp/" in path:
                if op in SCATTERS:
                    return "grad_reduce_scatter"
                return "fsdp_all_gather" if op in GATHERS else "other"
            if "/megatron/core/tensor_parallel/" in path:
                if not path.endswith("mappings.py") or name == "backward":
                    return "tp"  # the TP/SP layers, forward or backward
                seen_mappings = True  # a mapping called from somewhere: keep looking
            elif path.endswith(("model/llama.py", "megatron_latentcot/loss.py")):
                return "tp"  # the model's TP pieces, the vocab-parallel cross entropy
            elif path.endswith("model/latent.py") and name == "_latent_steps":
                return "latent_sync"
            frame = frame.f_back
        if seen_mappings:
            return "tp"
        return "p2p" if op in P2P else "other"

    # -- wrappers ------------------------------------------------------------------------------
    def _timed(self, op: str, fn: Callable[..., Any], args: tuple, kwargs: dict,
               count: Callable[[tuple[str, str]], None] | None = None) -> tuple[tuple[str, str], bool, Any]:
        """Make a wrapped call: classified and timed when outermost; ``count`` (torch-level
        calls) records calls and bytes when no torch-level call encloses it.
        Returns (tally key, outermost, result)."""
        outer = self._depth == 0
        if outer:
            self._category = self.classify(op)
        key = (self._category, op)
        torch_level = count is not None
        if torch_level and self._bytes_depth == 0:
            count(key)
        self._depth += 1
        self._bytes_depth += torch_level
        start = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        finally:
            self._depth -= 1
            self._bytes_depth -= torch_level
            if outer:
                self.tally(key).seconds += time.perf_counter() - start
        return key, outer, out

    def _wrap_torch(self, fn: Callable[..., Any], op: str) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        recorder = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not recorder.active:
                return fn(*args, **kwargs)

            def count(key: tuple[str, str]) -> None:
                try:
                    bound = sig.bind(*args, **kwargs).arguments
                except TypeError:
                    bound = {}
                buf, wire = payload_bytes(op, bound)
                t = recorder.tally(key)
                t.calls += 1
                t.bytes += buf
                t.wire_bytes += wire

            key, outer, out = recorder._timed(op, fn, args, kwargs, count)
            asynchronous = op in ("isend", "irecv") or kwargs.get("async_op", False)
            if outer and asynchronous and out is not None and not key[0].startswith(
                    ("fsdp", "grad_reduce")):  # FSDP2 type-checks its work handles
                return _TimedWork(out, recorder, key)
            return out

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def _wrap_entry(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        """A megatron SP/TP entry point: timed when outermost; a regather gather also tags its
        backward (the reduce-scatter autograd runs later) through hooks on its autograd node."""
        recorder = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not recorder.active:
                return fn(*args, **kwargs)
            _, _, out = recorder._timed(name, fn, args, kwargs)
            if recorder._tags and recorder._tags[-1] == "regather" and getattr(
                    out, "grad_fn", None) is not None:
                recorder.tag_backward(out.grad_fn, "regather")
            return out

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def tag_backward(self, node: Any, category: str) -> None:
        """Classify the collectives of autograd ``node``'s backward as ``category``."""
        def pre(grad_outputs: Any) -> None:
            self._tags.append(category)

        def post(grad_inputs: Any, grad_outputs: Any) -> None:
            if self._tags and self._tags[-1] == category:
                self._tags.pop()

        node.register_prehook(pre)
        node.register_hook(post)

    def _tagging(self, fn: Callable[..., Any], category: str) -> Callable[..., Any]:
        recorder = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with recorder.tag(category):
                return fn(*args, **kwargs)

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self._patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    # -- install -------------------------------------------------------------------------------
    def install_torch(self) -> None:
        """torch.distributed's collectives and p2p (as ``dist.<op>`` callers see them)."""
        for op in TORCH_OPS:
            if hasattr(dist, op):
                self._patch(dist, op, self._wrap_torch(getattr(dist, op), op))

    def install_megatron(self) -> None:
        """megatron-core's import-time aliases and SP entry points; our code's tag points."""
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel import layers, mappings

        from megatron_latentcot.model.latent import LatentStepScheduler
        from megatron_latentcot.training import optimizer
        from megatron_latentcot.training.loop import Engine
        from megatron_latentcot.training.optimizer import Optimizer

        for module in (mappings, layers):
            for alias in ("dist_all_gather_func", "dist_reduce_scatter_func"):
                fn = getattr(module, alias, None)
                if fn is not None:
                    op = getattr(fn, "__name__", alias)
                    self._patch(module, alias, self._wrap_torch(fn, op))
        for name in MEGATRON_ENTRY_POINTS:
            self._patch(tensor_parallel, name, self._wrap_entry(getattr(tensor_parallel, name), name))
        for owner, name, category in ((LatentStepScheduler, "_regather", "regather"),
                                      (LatentStepScheduler, "_tp_sum", "latent_sync"),
                                      (Optimizer, "finalize_grads", "grad_all_reduce"),
                                      (optimizer, "reduce_sharded_grads", "grad_reduce_scatter"),
                                      (Optimizer, "grad_norm", "metrics"),
                                      (Engine, "reduce_stats", "metrics")):
            self._patch(owner, name, self._tagging(getattr(owner, name), category))

    def uninstall(self) -> None:
        for owner, name, old in reversed(self._patched):
            setattr(owner, name, old)
        self._patched.clear()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{"category/op": tally}`` (JSON-friendly)."""
        return {f"{c}/{op}": asdict(t) for (c, op), t in sorted(self.tallies.items())}


# -- activations compaction saves ---------------------------------------------------------------

def saved_activation_bytes(active_fracs: list[float], tokens: int, hidden: int, layers: int,
                           bytes_per_value: int = 4) -> float:
    """Forward activations compaction keeps out of the layers in one iteration.

    At every latent step k > 1 the tokens not active at k ((1 - active_frac_k) x tokens, over
    all micro-batches and data-parallel ranks) are not run; without compaction each would
    carry its hidden state (``hidden`` values) into and out of every one of the ``layers``
    layers: (1 - f_k) x tokens x hidden x bytes x layers, summed over k >= 2. (The residual
    stream only; attention / MLP intermediates and the backward would add a multiple of it.)
    """
    return sum((1.0 - f) * tokens * hidden * bytes_per_value * layers for f in active_fracs[1:])


# -- layouts, sizes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    key: str
    world: int
    overrides: tuple[str, ...]
    description: str


LAYOUTS = [
    Layout("ref", 1, (), "1 process: no communication (reference)"),
    Layout("tp2sp_dp2", 4, ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                            "parallel.zero=fsdp2"),
           "TP2 + sequence parallel x DP2, FSDP2 (the regather path)"),
    Layout("tp2_dp2", 4, ("parallel.tensor_model_parallel_size=2", "parallel.zero=fsdp2"),
           "TP2 (no SP, no regather) x DP2, FSDP2"),
    Layout("pp2_dp2", 4, ("parallel.pipeline_model_parallel_size=2", "parallel.zero=fsdp2"),
           "PP2 x DP2, FSDP2 (latent loop through the stages: p2p)"),
    Layout("tp2_pp2", 4, ("parallel.tensor_model_parallel_size=2",
                          "parallel.pipeline_model_parallel_size=2"), "TP2 x PP2 (DP1)"),
    Layout("dp4", 4, ("parallel.zero=fsdp2",), "DP4, FSDP2 (pure data parallelism)"),
]
QUICK_SKIP = ("tp2_dp2",)


@dataclass(frozen=True)
class Setup:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    micro_batch: int
    global_batch: int
    rounds: int
    warmup: int
    repeats: int

    def overrides(self) -> list[str]:
        from benchmarks.common import shape_overrides

        return shape_overrides(self.hidden, self.layers, self.heads, self.ffn, self.vocab,
                               self.seq, self.micro_batch, self.global_batch) + [
            "train.lr_warmup_iters=0", "parallel.backend=gloo", "train.precision=fp32",
            "model.embedding_multiplier=null", "latent.method=adaptive",
            f"latent.max_steps={K_MAX}", f"latent.tau={TAU}"]


K_MAX, TAU = 4, 0.3
SETUPS = {False: Setup(256, 4, 4, 688, 2048, 128, 1, 4, rounds=2, warmup=1, repeats=2),
          True: Setup(128, 2, 4, 344, 1024, 64, 1, 4, rounds=1, warmup=1, repeats=2)}


def global_batch(setup: Setup, round_: int, i: int) -> torch.Tensor:
    """The i-th global batch of a round (every layout sees the same sequence)."""
    g = torch.Generator().manual_seed(1000 * round_ + i)
    return torch.randint(0, setup.vocab, (setup.global_batch, setup.seq + 1), generator=g)


def rank_microbatches(batch: torch.Tensor, mbs: int, dp_rank: int, dp_size: int) -> list[dict]:
    share = batch.chunk(dp_size)[dp_rank]
    return [{"tokens": s[:, :-1].contiguous(), "labels": s[:, 1:].contiguous(),
             "loss_mask": torch.ones(s.shape[0], s.shape[1] - 1)} for s in share.split(mbs)]


# -- one layout on one rank ---------------------------------------------------------------------

def run_layout(layout: Layout, setup: Setup, round_: int, recorder: CommRecorder) -> dict[str, Any]:
    """Build the engine, warm up, time ``setup.repeats`` train steps; this rank's records."""
    from benchmarks.common import make_config
    from megatron_latentcot.parallel import init_distributed
    from megatron_latentcot.training.loop import Engine

    cfg = make_config(setup.overrides() + list(layout.overrides))
    ctx = init_distributed(cfg.parallel)
    engine = Engine(cfg, ctx, setup.vocab)
    iterations = []
    for i in range(setup.warmup + setup.repeats):
        mbs = rank_microbatches(global_batch(setup, round_, i), setup.micro_batch, ctx.dp_rank,
                                ctx.dp_size)
        if ctx.world_size > 1:
            dist.barrier()  # start together (not recorded)
        recorder.reset()
        recorder.active = True
        start, cpu = time.perf_counter(), time.process_time()
        try:
            metrics = engine.train_step(mbs)
        finally:
            recorder.active = False
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if i >= setup.warmup:
            iterations.append({"wall": wall, "cpu": cpu, "comm": recorder.snapshot(),
                               "metrics": metrics})
    coords = {"rank": ctx.rank, "tp": ctx.tp_rank, "pp": ctx.pp_rank, "dp": ctx.dp_rank,
              # FSDP2 units of this rank's stage (each needs one parameter all-gather)
              "fsdp_units": sum(1 for m in engine.model.modules()
                                if hasattr(m, "set_reshard_after_backward"))}
    del engine
    gc.collect()
    if ctx.world_size > 1:
        dist.barrier()
    return {"coords": coords, "iterations": iterations}


def gloo_probe(repeats: int = 5) -> dict[str, float]:
    """Latency of a 1-element all-reduce and throughput of a 1 MiB/rank all-gather over the
    world (gloo, this machine, right now): to tell transfer from waiting in the comm times."""
    world = dist.get_world_size()
    small = torch.zeros(1)
    lat = []
    for _ in range(repeats * 4):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(small)
        lat.append(time.perf_counter() - t)
    inp = torch.zeros(2**18)  # 1 MiB of float32
    out = torch.empty(world * inp.numel())
    bw = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        dist.all_gather_into_tensor(out, inp)
        bw.append(_nbytes(out) * (world - 1) / world / (time.perf_counter() - t))
    return {"all_reduce_latency_s": statistics.median(lat),
            "all_gather_wire_bytes_per_s": statistics.median(bw)}


def quiet_warnings() -> None:
    """Once-per-process library warnings that would drown the output (reported in NOTES)."""
    import warnings

    for pattern in (r".*returned a view tensor.*", r".*is deprecated. Please use.*",
                    r".*CUDA_DEVICE_MAX_CONNECTIONS.*", r".*Transformer Engine and Apex.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _worker(rank: int, world: int, port: int, layouts: list[Layout], setup: Setup,
            results: Any, go: list[Any], stop: Any) -> None:
    """One rank: every layout, round by round (round r starts when the parent sets go[r],
    unless it set ``stop`` first: the time budget is spent)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        torch.set_num_threads(1)
        quiet_warnings()
        import benchmarks.common  # noqa: F401  (megatron-core; already loaded when forked)

        recorder = CommRecorder()
        recorder.install_torch()
        recorder.install_megatron()
        out: dict[str, list] = {layout.key: [] for layout in layouts}
        results.put((rank, "ready", None))
        for r in range(setup.rounds):
            go[r].wait()
            if stop.is_set():
                break
            for layout in layouts:
                out[layout.key].append(run_layout(layout, setup, r, recorder))
            dist.barrier()
            if rank == 0:
                results.put((rank, "round", r))
        probe = gloo_probe()
        from megatron_latentcot.parallel import destroy_distributed

        destroy_distributed()
        results.put((rank, "ok", pickle.dumps({"runs": out, "probe": probe})))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- aggregation --------------------------------------------------------------------------------

def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def summarize(layout: Layout, setup: Setup, runs: list[list[dict]],
              probe: dict[str, float] | None) -> dict[str, Any]:
    """Rows of one layout: ``runs[rank][round]`` -> medians over all timed iterations.

    Per iteration: s/iter = the slowest rank's wall time; category times = mean over ranks;
    compute = mean over ranks of (wall - communication); bytes = summed over ranks (wire:
    the bytes on the network). Then the median over the iterations of every round.
    """
    per_iter: list[dict[str, Any]] = []
    ranks = len(runs)
    for r in range(len(runs[0])):
        for i in range(len(runs[0][r]["iterations"])):
            its = [runs[k][r]["iterations"][i] for k in range(ranks)]
            cat_s = dict.fromkeys(CATEGORIES, 0.0)
            cat_wire = dict.fromkeys(CATEGORIES, 0)
            cat_calls = dict.fromkeys(CATEGORIES, 0)
            op_rows: dict[str, dict[str, float]] = {}
            comm_per_rank = []
            for it in its:
                comm = 0.0
                for key, t in it["comm"].items():
                    cat = key.split("/", 1)[0]
                    cat_s[cat] += t["seconds"] / ranks
                    cat_wire[cat] += t["wire_bytes"]
                    cat_calls[cat] += t["calls"]
                    comm += t["seconds"]
                    row = op_rows.setdefault(key, {"calls": 0, "seconds": 0.0, "bytes": 0,
                                                   "wire_bytes": 0})
                    row["calls"] += t["calls"]
                    row["seconds"] += t["seconds"] / ranks
                    row["bytes"] += t["bytes"]
                    row["wire_bytes"] += t["wire_bytes"]
                comm_per_rank.append(comm)
            walls = [it["wall"] for it in its]
            compute = [w - c for w, c in zip(walls, comm_per_rank)]
            m = its[-1]["metrics"]
            fracs = [m[f"active_frac_step{k}"] for k in range(1, K_MAX + 1)]
            per_iter.append({
                "wall_max": max(walls), "wall_mean": sum(walls) / ranks,
                "compute_mean": sum(compute) / ranks, "comm_mean": sum(comm_per_rank) / ranks,
                "compute_frac": sum(compute) / sum(walls),
                "cpu_over_wall": sum(it["cpu"] for it in its) / sum(walls),
                "per_rank_wall": walls, "per_rank_comm": comm_per_rank,
                "cat_s": cat_s, "cat_wire": cat_wire, "cat_calls": cat_calls, "ops": op_rows,
                "active_frac": fracs, "mean_steps": m["mean_steps"], "lm_loss": m["lm_loss"],
                "saved_bytes": saved_activation_bytes(fracs, setup.global_batch * setup.seq,
                                                      setup.hidden, setup.layers)})
    med = lambda key: _median([p[key] for p in per_iter])  # noqa: E731
    cat_s = {c: _median([p["cat_s"][c] for p in per_iter]) for c in CATEGORIES}
    cat_wire = {c: statistics.mean([p["cat_wire"][c] for p in per_iter]) for c in CATEGORIES}
    cat_calls = {c: statistics.mean([p["cat_calls"][c] for p in per_iter]) for c in CATEGORIES}
    ops: dict[str, dict[str, float]] = {}
    for p in per_iter:
        for key, row in p["ops"].items():
            acc = ops.setdefault(key, {"calls": 0.0, "seconds": [], "bytes": 0.0,
                                       "wire_bytes": 0.0})
            acc["calls"] += row["calls"] / len(per_iter)
            acc["seconds"].append(row["seconds"])
            acc["bytes"] += row["bytes"] / len(per_iter)
            acc["wire_bytes"] += row["wire_bytes"] / len(per_iter)
    for acc in ops.values():
        acc["seconds"] = _median(acc["seconds"] + [0.0] * (len(per_iter) - len(acc["seconds"])))
    saved = statistics.mean([p["saved_bytes"] for p in per_iter])
    regather = cat_wire["regather"]
    regather_fwd = sum(v["wire_bytes"] for k, v in ops.items()
                       if k.startswith("regather/") and "scatter" not in k)
    estimate = None
    if probe and ranks > 1:  # the comm time if every call only paid latency + bandwidth
        calls_rank = sum(cat_calls.values()) / ranks
        wire_rank = sum(cat_wire.values()) / ranks
        estimate = (calls_rank * probe["all_reduce_latency_s"]
                    + wire_rank / probe["all_gather_wire_bytes_per_s"])
    calls_per_rank = sum(cat_calls.values()) / ranks
    fsdp_units = sum(runs[k][0]["coords"].get("fsdp_units", 0) for k in range(ranks))
    fsdp_gathers = sum(v["calls"] for k, v in ops.items() if k.startswith("fsdp_all_gather/"))
    rounds_wall = [[runs[k][r]["iterations"][i]["wall"] for k in range(ranks)]
                   for r in range(len(runs[0])) for i in range(len(runs[0][r]["iterations"]))]
    return {
        "layout": layout.key, "description": layout.description, "processes": layout.world,
        "overrides": list(layout.overrides), "iterations": len(per_iter),
        "s_per_iter": med("wall_max"), "s_per_iter_rank_mean": med("wall_mean"),
        "compute_s": med("compute_mean"), "comm_s": med("comm_mean"),
        "compute_frac": med("compute_frac"), "cpu_over_wall": med("cpu_over_wall"),
        "spread": ((max(p["wall_max"] for p in per_iter) - min(p["wall_max"] for p in per_iter))
                   / med("wall_max")) if per_iter else None,
        "comm_s_by_category": cat_s, "comm_wire_bytes_by_category": cat_wire,
        "comm_calls_by_category": cat_calls, "comm_by_op": ops,
        "regather_wire_bytes": regather, "regather_forward_wire_bytes": regather_fwd,
        "saved_activation_bytes": saved,
        "regather_over_saved": regather / saved if saved else None,
        "comm_latency_bandwidth_estimate_s": estimate, "comm_calls_per_rank": calls_per_rank,
        # FSDP2 parameter all-gathers per iteration (all ranks) against the FSDP units (one
        # gather each would do): more means re-gathers in the backward
        "fsdp_all_gathers": fsdp_gathers, "fsdp_units": fsdp_units,
        "active_frac": [_median([p["active_frac"][k] for p in per_iter]) for k in range(K_MAX)],
        "mean_steps": med("mean_steps"), "lm_loss_last": per_iter[-1]["lm_loss"],
        "per_rank": [{"coords": runs[k][0]["coords"],
                      "wall_s": _median([p["per_rank_wall"][k] for p in per_iter]),
                      "comm_s": _median([p["per_rank_comm"][k] for p in per_iter])}
                     for k in range(ranks)],
        "wall_s_all": rounds_wall,
    }


# -- the benchmark ------------------------------------------------------------------------------

COLUMNS = [("layout", "layout", ""), ("s_per_iter", "s/iter", ".2f"), ("spread", "spread", ".2f"),
           ("compute_pct", "compute %", ".1f"), ("comm_ms", "comm ms", ".0f"),
           ("calls", "calls/rank", ".0f"), ("est_ms", "comm est ms", ".0f"),
           ("regather_ms", "regather ms", ".0f"),
           ("regather_mb", "regather MB", ".2f"), ("latent_sync_ms", "sync ms", ".0f"),
           ("tp_ms", "tp ms", ".0f"), ("tp_mb", "tp MB", ".1f"), ("p2p_ms", "p2p ms", ".0f"),
           ("p2p_mb", "p2p MB", ".1f"), ("ag_ms", "fsdp AG ms", ".0f"),
           ("rs_ms", "grad RS ms", ".0f"), ("rs_mb", "grad RS MB", ".1f"),
           ("ar_ms", "grad AR ms", ".0f"), ("ar_mb", "grad AR MB", ".2f"),
           ("misc_ms", "metrics+other ms", ".0f"), ("saved_mb", "saved act MB", ".1f"),
           ("ratio", "regather/saved", ".3f")]


def table_row(s: dict[str, Any]) -> dict[str, Any]:
    ms = {c: 1e3 * v for c, v in s["comm_s_by_category"].items()}
    mb = {c: v / 1e6 for c, v in s["comm_wire_bytes_by_category"].items()}
    return {"layout": s["layout"], "s_per_iter": s["s_per_iter"], "spread": s["spread"],
            "compute_pct": 100 * s["compute_frac"], "comm_ms": 1e3 * s["comm_s"],
            "calls": s["comm_calls_per_rank"],
            "est_ms": None if s["comm_latency_bandwidth_estimate_s"] is None
            else 1e3 * s["comm_latency_bandwidth_estimate_s"],
            "regather_ms": ms["regather"],
            "regather_mb": mb["regather"], "latent_sync_ms": ms["latent_sync"], "tp_ms": ms["tp"],
            "tp_mb": mb["tp"], "p2p_ms": ms["p2p"], "p2p_mb": mb["p2p"],
            "ag_ms": ms["fsdp_all_gather"], "rs_ms": ms["grad_reduce_scatter"],
            "rs_mb": mb["grad_reduce_scatter"], "ar_ms": ms["grad_all_reduce"],
            "ar_mb": mb["grad_all_reduce"], "misc_ms": ms["metrics"] + ms["other"],
            "saved_mb": s["saved_activation_bytes"] / 1e6, "ratio": s["regather_over_saved"]}


NOTES = [
    "s/iter: Engine.train_step (forward + backward + optimizer step), the slowest rank, median "
    "over the timed iterations of all rounds; every round rebuilds every layout from the same seed "
    "and feeds the same global batches, and rounds interleave the layouts (the reference runs in the "
    "parent process while the 4 workers wait), so slow periods of the shared machine spread over all.",
    "compute % = mean over ranks of (wall - time inside wrapped communication calls) / wall. "
    "Communication wall time includes WAITING for the peer: on gloo a collective or a blocking recv "
    "returns only when the slowest rank arrives, so load imbalance, the pipeline bubble and OS "
    "scheduling of 4 single-threaded processes on 2 shared cores all count as communication. "
    "comm_latency_bandwidth_estimate_s prices the same calls at the gloo probe's latency and "
    "bandwidth (what the transfers alone would cost).",
    "Times per category: mean over ranks, median over iterations. Bytes: wire bytes (ring model: "
    "all-gather / reduce-scatter (n-1)/n x buffer, all-reduce 2(n-1)/n x buffer, send = tensor) "
    "summed over all ranks, mean per iteration, in MB = 1e6 bytes. comm_by_op also has buffer "
    "bytes (the gathered output / the scattered input / the tensor) and call counts.",
    "Categories: regather = everything issued inside LatentStepScheduler._regather (counts, slots, "
    "reach and z all-gathers) plus the backward of its differentiable gathers (reduce-scatter of the "
    "reach and z gradients, tagged by hooks on their autograd nodes); latent_sync = the rest of the "
    "SP latent loop's collectives (live-count all-reduces each step, the z^f all-reduce, the "
    "steps MAX, the adaptive-loss sum); tp = megatron's TP/SP layers, the vocab-parallel cross "
    "entropy (loss.py: 3 all-reduces per call, also for the per-step p_target) and the backward of "
    "any megatron mapping (e.g. z^f's scatter); p2p = pipeline send/recv/isend/irecv (isend: launch + "
    "wait); fsdp_all_gather / grad_reduce_scatter = FSDP2 parameter unshard / gradient "
    "reduce-scatter; grad_all_reduce = Optimizer.finalize_grads (SP-partial gradients over TP, DP "
    "without ZeRO); metrics = grad-norm and loss-stat all-reduces / broadcasts.",
    "saved activation bytes: for each latent step k > 1, (1 - active_frac_k) x (global batch x seq) "
    "tokens x hidden x 4 bytes (fp32) x num_layers: the residual-stream activations the tokens not "
    "active at k would have carried through every layer, forward, had they run (uncompacted); the "
    "whole job's, per iteration. regather/saved compares the regather's wire bytes (whole job, "
    "forward gathers + backward reduce-scatters) with it; regather_forward_wire_bytes is the "
    "forward part alone.",
    "Not measurable here: overlap of communication with compute (gloo async work runs on its own "
    "thread; we see only the exposed launch + wait), NCCL/NVLink behaviour, bf16 payloads (CPU runs "
    "fp32), and absolute speed (1 torch thread per process, 4 processes on 2 cores shared with "
    "other jobs: the reference process has a core to itself more often than a worker). Compare "
    "ratios within one run. Wrapper overhead (argument binding, a stack walk) is a few tens of "
    "microseconds per call and is counted as compute.",
]


def main(argv: list[str] | None = None) -> None:
    quiet_warnings()
    from benchmarks.common import LOAD_AT_START, base_parser, format_table, usable_cores, write_json

    p = base_parser(__doc__.splitlines()[0], "benchmarks/results/parallel.json")
    p.add_argument("--rounds", type=int, default=None, help="override rounds over all layouts")
    p.add_argument("--layouts", default=None,
                   help="comma-separated subset of " + ",".join(lay.key for lay in LAYOUTS))
    p.add_argument("--timeout", type=float, default=1200, help="seconds before giving up")
    p.add_argument("--budget", type=float, default=540,
                   help="start another round only if it should end within this many seconds")
    p.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                   help="how the workers start (fork: they inherit the imports)")
    args = p.parse_args(argv)
    if args.device not in (None, "cpu"):
        raise SystemExit("benchmarks.parallel runs on CPU / gloo only")
    device = torch.device("cpu")
    setup = SETUPS[args.quick]
    over = {k: v for k, v in (("rounds", args.rounds), ("warmup", args.warmup),
                              ("repeats", args.repeats)) if v is not None}
    setup = Setup(**{**asdict(setup), **over})
    layouts = [lay for lay in LAYOUTS if not (args.quick and lay.key in QUICK_SKIP)]
    if args.layouts:
        wanted = args.layouts.split(",")
        unknown = set(wanted) - {lay.key for lay in LAYOUTS}
        if unknown:
            raise SystemExit(f"--layouts: unknown {sorted(unknown)}")
        layouts = [lay for lay in LAYOUTS if lay.key in wanted]
    ref = [lay for lay in layouts if lay.world == 1]
    multi = [lay for lay in layouts if lay.world > 1]
    worlds = {lay.world for lay in multi}
    if len(worlds) > 1:
        raise SystemExit("all multi-process layouts must share one world size")
    world = worlds.pop() if worlds else 0
    command = " ".join(["python", "-m", "benchmarks.parallel", *(sys.argv[1:] if argv is None
                                                                    else argv)])
    torch.set_num_threads(args.threads or 1)
    print(f"parallel layouts on cpu/gloo: {[lay.key for lay in layouts]}, {setup}; load average "
          f"{LOAD_AT_START} on {usable_cores()} usable cores", flush=True)
    start_all = time.perf_counter()

    ref_runs: dict[str, list] = {lay.key: [] for lay in ref}
    worker_out: list[dict] = []
    procs: list[Any] = []
    # fork (default): the workers inherit the imported megatron-core instead of importing it
    # again (~30 s each on a loaded machine); nothing is patched nor initialised before it.
    ctx = mp.get_context(args.start_method)
    results = ctx.Queue()
    go = [ctx.Event() for _ in range(setup.rounds)]
    stop = ctx.Event()
    rounds_done = 0
    deadline = time.monotonic() + args.timeout
    recorder: CommRecorder | None = None

    def get() -> tuple[int, str, Any]:
        try:
            rank, status, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue_mod.Empty:
            raise SystemExit(f"timed out after {args.timeout:.0f} s waiting for the workers") from None
        if status == "error":
            raise SystemExit(f"rank {rank} failed:\n{value}")
        return rank, status, value

    failed = True
    try:
        if multi:
            port = _free_port()
            procs = [ctx.Process(target=_worker, args=(r, world, port, multi, setup, results, go,
                                                       stop))
                     for r in range(world)]
            for proc in procs:
                proc.start()
            for _ in range(world):
                get()  # "ready": imports done, so they do not compete with the reference
            print(f"  {world} workers ready after {time.perf_counter() - start_all:.0f} s",
                  flush=True)
        recorder = CommRecorder()  # the parent's, for the reference (after the fork)
        recorder.install_torch()
        recorder.install_megatron()
        for r in range(setup.rounds):
            for lay in ref:
                ref_runs[lay.key].append(run_layout(lay, setup, r, recorder))
            if multi:
                go[r].set()
                get()  # rank 0: round r done
            rounds_done = r + 1
            spent = time.perf_counter() - start_all
            print(f"  round {r + 1}/{setup.rounds} done after {spent:.0f} s", flush=True)
            if r + 1 < setup.rounds and spent * (r + 2) / (r + 1) > args.budget:
                print(f"  stopping after {r + 1} round(s): another would end past --budget "
                      f"{args.budget:.0f} s (the machine is slow right now)", flush=True)
                stop.set()
                go[r + 1].set()
                break
        if multi:
            worker_out = [{}] * world
            for _ in range(world):
                rank, _, value = get()
                worker_out[rank] = pickle.loads(value)
        failed = False
    finally:
        for proc in procs:  # on failure the others may hang in a collective: do not wait long
            proc.join(timeout=5 if failed else 60)
            if proc.is_alive():
                proc.kill()
        if recorder is not None:
            recorder.uninstall()
    elapsed = time.perf_counter() - start_all

    probe = worker_out[0]["probe"] if worker_out else None
    summaries = []
    for lay in layouts:
        runs = ([ref_runs[lay.key]] if lay.world == 1
                else [worker_out[k]["runs"][lay.key] for k in range(world)])
        summaries.append(summarize(lay, setup, runs, probe))
    base = next((s for s in summaries if s["layout"] == "ref"), None)
    for s in summaries:
        s["time_over_ref"] = s["s_per_iter"] / base["s_per_iter"] if base else None
    print()
    print(format_table([table_row(s) for s in summaries], COLUMNS))
    print("\nactive fraction per step / mean steps (should agree across layouts):")
    for s in summaries:
        print(f"  {s['layout']:10s} {[round(f, 3) for f in s['active_frac']]}  "
              f"{s['mean_steps']:.3f}  ({s['description']})")
    print("FSDP2 parameter all-gathers per iteration (all ranks) / FSDP units (one gather each):")
    for s in summaries:
        if s["fsdp_units"]:
            print(f"  {s['layout']:10s} {s['fsdp_all_gathers']:.0f} / {s['fsdp_units']}")
    if probe:
        print(f"gloo probe: all-reduce latency {1e6 * probe['all_reduce_latency_s']:.0f} us, "
              f"all-gather {probe['all_gather_wire_bytes_per_s'] / 1e6:.0f} MB/s per rank")
    load_end = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"load average start {LOAD_AT_START}, end {load_end}; {elapsed:.0f} s")
    args.command = command
    path = write_json(args.out, "parallel", device, args, {
        "command": command, "setup": asdict(setup), "k_max": K_MAX, "tau": TAU,
        "layouts": [asdict(lay) for lay in layouts], "torch_threads_per_process": 1,
        "load_average_start": LOAD_AT_START, "load_average_end": load_end,
        "elapsed_s": elapsed, "rounds_done": rounds_done, "gloo_probe": probe, "results": summaries,
        "table": [table_row(s) for s in summaries], "notes": NOTES})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
