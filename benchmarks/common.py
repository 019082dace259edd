"""Shared benchmark helpers: device/context setup, timing, synthetic batches, tables, JSON.

Every script runs as ``python -m benchmarks.<name> [--quick] [--device cpu|cuda] [--out PATH]``
from the repository root, at world size 1, through the package's own :class:`Engine`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

LOAD_AT_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

with warnings.catch_warnings():  # megatron-core: "Transformer Engine and Apex are not installed"
    warnings.simplefilter("ignore", UserWarning)
    import megatron_latentcot.training.loop  # noqa: F401  (imports megatron-core's optimizer)
    from megatron_latentcot.config import Config, ParallelConfig, load_config
    from megatron_latentcot.parallel import ParallelContext, init_distributed


# -- command line, device, threads ------------------------------------------------------------

def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every benchmark shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small configs, few repeats (< 1 minute on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--out", type=Path, default=REPO_ROOT / default_out, help="JSON output path")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the cores this process may use)")
    p.add_argument("--warmup", type=int, default=None, help="override warmup iterations")
    p.add_argument("--repeats", type=int, default=None, help="override timed iterations")
    return p


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: the usable core count); returns the count."""
    n = threads or usable_cores()
    torch.set_num_threads(n)
    return n


def warn_if_busy() -> None:
    """Say so when other processes already load the cores: wall-clock timings will be inflated."""
    if LOAD_AT_START and LOAD_AT_START[0] > usable_cores():
        print(f"warning: 1-minute load average {LOAD_AT_START[0]:.1f} > {usable_cores()} usable "
              "cores: other processes share the CPU, timings are inflated and noisy", flush=True)


def backend_overrides(device: torch.device) -> list[str]:
    """Config overrides that put the run on ``device`` (nccl -> cuda, gloo -> cpu) at world 1;
    bf16 on CUDA, fp32 on CPU."""
    if device.type == "cuda":
        return ["parallel.backend=nccl", "train.precision=bf16"]
    return ["parallel.backend=gloo", "train.precision=fp32"]


def build_context(device: torch.device) -> ParallelContext:
    """A world-of-one process group on ``device`` (reused by every engine of the process)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    ctx = init_distributed(ParallelConfig(backend=backend))
    if ctx.device.type != device.type:
        raise RuntimeError(f"asked for {device}, the process group put us on {ctx.device}")
    return ctx


def shape_overrides(hidden: int, layers: int, heads: int, ffn: int, vocab: int, seq: int,
                    micro_batch: int, global_batch: int | None = None) -> list[str]:
    """Config overrides of a benchmark's model and batch shape (global batch: one micro-batch
    unless given)."""
    return [f"model.hidden_size={hidden}", f"model.num_layers={layers}",
            f"model.num_attention_heads={heads}", f"model.ffn_hidden_size={ffn}",
            f"model.vocab_size={vocab}", f"model.max_position_embeddings={seq}",
            f"data.seq_length={seq}", f"train.micro_batch_size={micro_batch}",
            f"train.global_batch_size={global_batch or micro_batch}"]


def make_config(overrides: Sequence[str]) -> Config:
    return load_config(None, list(overrides))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak RSS on CPU (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# -- synthetic data ---------------------------------------------------------------------------

def synthetic_microbatch(rows: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random token ids, next-token labels, full loss mask (on the CPU: the engine moves
    micro-batches to its device, as in training)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    return {"tokens": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous(),
            "loss_mask": torch.ones(rows, seq)}


# -- timing -----------------------------------------------------------------------------------

@dataclass
class Timing:
    """Wall-clock seconds of the timed repeats (after warmup), and this process's CPU seconds
    (all threads) over the same repeats: cpu/wall far below the thread count on an otherwise
    idle CPU device means the cores were shared."""

    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        cpu_over_wall = sum(self.cpu_times) / sum(self.times) if sum(self.times) > 0 else None
        return dict(asdict(self), median=self.median, best=self.best, spread=self.spread,
                    cpu_over_wall=cpu_over_wall)


def time_it(fn: Callable[[], Any], device: torch.device, warmup: int,
            repeats: int) -> tuple[Timing, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (device-synchronised).

    Returns the timing and the last call's result.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    timing = Timing(warmup=warmup)
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        synchronize(device)
        timing.times.append(time.perf_counter() - start)
        timing.cpu_times.append(time.process_time() - cpu)
    return timing, result


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, tuple[Timing, Any]]:
    """Like :func:`time_it` for several functions, run round-robin (warmup rounds untimed).

    Interleaving spreads slow periods of a shared machine over all of them, so their ratios stay
    meaningful where a block-by-block measurement would not.
    """
    timings = {name: Timing(warmup=warmup) for name in fns}
    results: dict[str, Any] = dict.fromkeys(fns)
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            start, cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            synchronize(device)
            if round_ >= warmup:
                timings[name].times.append(time.perf_counter() - start)
                timings[name].cpu_times.append(time.process_time() - cpu)
    return {name: (timings[name], results[name]) for name in fns}


# -- machine description, JSON, tables --------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (and at which commit)."""
    try:
        import megatron.core as mcore

        mcore_version = getattr(mcore, "__version__", None)
    except ImportError:
        mcore_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": mcore_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        # 1/5/15-minute load averages when the benchmark started and ended: a load above the
        # usable core count means other processes shared the cores and timings are inflated.
        "load_average_start": LOAD_AT_START,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> null, tuples -> lists, tensors -> numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    return value


def write_json(path: Path, benchmark: str, device: torch.device, args: argparse.Namespace,
               payload: dict[str, Any]) -> Path:
    """Write ``payload`` with the machine description and the command-line arguments."""
    doc = {"benchmark": benchmark, "machine": machine_info(device),
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           **payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(doc), indent=2) + "\n")
    return path


Column = tuple[str, str, str]  # (key, header, format spec; "" = str())


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A plain aligned text table; missing / None values print as '-'."""
    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        v = row.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return format(v, spec) if spec else str(v)

    body = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(line[i]) for line in body]) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and those outside the embedding / LM head (world size 1: all of them)."""
    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for n, p in model.named_parameters()
                if "embed_tokens" in n or "lm_head" in n)
    return {"params": total, "non_embedding_params": total - embed}
