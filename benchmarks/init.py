"""Start-up cost of one rank: build its model stage and initialise its weights (CPU).

The 7B config (examples/configs/7b_adaptive.yaml: TP=4, PP=1) as rank ``--rank`` of the
tensor-parallel group, in ONE process: a ``fake`` process group (torch's FakeStore; no
collective runs at construction or initialisation) stands in for the other ranks, so this
measures exactly the work and memory of one rank:

* ``build_s``: ``LlamaStage`` on the meta device, then this rank's parameters allocated;
* ``init_s``: ``init_weights``, which draws this rank's slice of every logical weight in
  ``INIT_BLOCK``-index blocks from per-block generators (layout-independent values);
* ``*_cpu_s``: the same in this process's CPU seconds (run with ``--threads 1``: on shared
  cores the wall time is inflated, the CPU seconds are the work of one rank on one core);
* ``peak_rss_gib`` against ``shard_gib`` (this rank's parameters in fp32) and the whole
  model's fp32 size: the memory is about the shard, not the model;
* the previous implementation drew every full logical weight with ``nn.init.trunc_normal_``
  and kept the slice: its rate (elements per second) is measured on layer 0's attention
  weights and ``old_estimated_s`` = the full model's elements / that rate (not run whole: it
  takes minutes).

    python -m benchmarks.init [--quick] [--config PATH] [--tp N] [--rank R] [--out PATH]
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import REPO_ROOT, base_parser, configure_threads, warn_if_busy, write_json


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def fake_tensor_parallel_rank(tp: int, rank: int):
    """This process as rank ``rank`` of a TP group of ``tp`` (PP = DP = 1) on a fake group."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_latentcot.parallel import ParallelContext

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             create_gloo_process_groups=False)
    return ParallelContext(rank=rank, world_size=tp, local_rank=rank, tp_rank=rank, tp_size=tp,
                           pp_rank=0, pp_size=1, dp_rank=0, dp_size=1,
                           device=torch.device("cpu"))


def old_rate(stage, cfg_model, min_elements: int) -> dict[str, float]:
    """Elements per second of the previous init (a full ``trunc_normal_`` per logical weight),
    over layer 0's first logical weights holding at least ``min_elements``."""
    from torch import nn

    from megatron_latentcot.model.llama import _init_std, logical_parameters

    shapes, total = [], 0
    for name, lp in logical_parameters(stage):
        if name.startswith("layers.0.") and _init_std(name, cfg_model) is not None \
                and total < min_elements:
            shapes.append((name, lp.shape))
            total += math.prod(lp.shape)
    elements, start, cpu = 0, time.perf_counter(), time.process_time()
    for name, shape in shapes:
        std = _init_std(name, cfg_model)
        gen = torch.Generator().manual_seed(0)
        full = torch.empty(shape)
        nn.init.trunc_normal_(full, std=std, a=-2 * std, b=2 * std, generator=gen)
        elements += full.numel()
        del full
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"elements": elements, "seconds": seconds, "cpu_s": cpu,
            "elements_per_s": elements / seconds, "elements_per_cpu_s": elements / cpu}


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[0], "benchmarks/results/init.json")
    p.add_argument("--config", default=str(REPO_ROOT / "examples/configs/7b_adaptive.yaml"))
    p.add_argument("--tp", type=int, default=None, help="default: the config's TP size")
    p.add_argument("--rank", type=int, default=0, help="the TP rank to build")
    p.add_argument("--target-s", type=float, default=60.0, help="build + init time target")
    args = p.parse_args(argv)
    threads = configure_threads(args.threads)
    warn_if_busy()
    from megatron_latentcot.config import load_config
    from megatron_latentcot.model.llama import LlamaStage, init_weights
    from megatron_latentcot.plan import total_params
    from megatron_latentcot.vocab import padded_vocab_size

    overrides = ["parallel.sequence_parallel=false"]
    if args.quick:  # a quarter of the layers: the same per-layer work, a smoke run
        overrides.append("model.num_layers=8")
    if args.tp:
        overrides.append(f"parallel.tensor_model_parallel_size={args.tp}")
    cfg = load_config(args.config, overrides)
    tp = cfg.parallel.tensor_model_parallel_size
    vocab = padded_vocab_size(cfg.model, cfg.model.vocab_size or 50304, tp)
    ctx = fake_tensor_parallel_rank(tp, args.rank)
    rss0 = rss_gib()
    start, cpu0 = time.perf_counter(), time.process_time()
    stage = LlamaStage(cfg, ctx, vocab)
    built, cpu1 = time.perf_counter(), time.process_time()
    init_weights(stage, cfg.model, cfg.train.seed)
    done, cpu2 = time.perf_counter(), time.process_time()
    shard = sum(p.numel() for p in stage.parameters())
    model = total_params(cfg, vocab)
    row: dict[str, Any] = {
        "config": os.path.relpath(args.config, REPO_ROOT), "quick": args.quick,
        "layers": cfg.model.num_layers, "tp": tp, "rank": args.rank, "vocab": vocab,
        "threads": threads, "model_params": model, "shard_params": shard,
        "model_gib_fp32": 4 * model / 2**30, "shard_gib": 4 * shard / 2**30,
        "build_s": built - start, "init_s": done - built, "total_s": done - start,
        # CPU seconds of this process: on shared cores the wall time is inflated, these are not
        "build_cpu_s": cpu1 - cpu0, "init_cpu_s": cpu2 - cpu1, "total_cpu_s": cpu2 - cpu0,
        "shard_elements_per_s": shard / (done - built),
        "rss_before_gib": rss0, "rss_after_gib": rss_gib(), "peak_rss_gib": peak_rss_gib(),
    }
    row["peak_over_shard"] = (row["peak_rss_gib"] - rss0) / row["shard_gib"]
    row["within_target"] = row["total_s"] <= args.target_s
    row["cpu_within_target"] = row["total_cpu_s"] <= args.target_s
    print(f"{row['config']} TP={tp} rank {args.rank}: {shard:,} of {model:,} parameters "
          f"({row['shard_gib']:.2f} of {row['model_gib_fp32']:.2f} GiB fp32); build "
          f"{row['build_s']:.1f} s, init {row['init_s']:.1f} s ({row['init_cpu_s']:.1f} CPU-s); "
          f"peak RSS "
          f"{row['peak_rss_gib']:.2f} GiB (before {rss0:.2f})", flush=True)
    if not args.quick:
        old = old_rate(stage, cfg.model, min_elements=50_000_000)
        row["old"] = old
        row["old_estimated_s"] = model / old["elements_per_s"]
        row["old_estimated_cpu_s"] = model / old["elements_per_cpu_s"]
        row["speedup_vs_old"] = row["old_estimated_s"] / row["total_s"]
        row["cpu_speedup_vs_old"] = row["old_estimated_cpu_s"] / row["total_cpu_s"]
        print(f"old full-tensor init: {old['elements_per_s'] / 1e6:.1f}M elements/s -> "
              f"{row['old_estimated_s']:.0f} s for the whole model on every rank", flush=True)
    path = write_json(args.out, "init", torch.device("cpu"), args, {
        "result": row, "target_s": args.target_s,
        "notes": "one TP rank in one process (fake process group); build = meta-device "
                 "construction + allocation of this rank's parameters; init = init_weights "
                 "(per-block generators, only this rank's blocks); peak RSS includes the ~0.4 "
                 "GiB of imports (rss_before_gib); old_estimated_s extrapolates the measured "
                 "rate of the previous full-tensor init to the whole model"})
    print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
