"""Training throughput of ``Engine.train_step`` (forward + backward + AdamW) at world size 1.

Per configuration: parameters, tokens/s, achieved TFLOP/s from the engine's own exact FLOPs
count (the ``flops`` stat of ``train_step``; the Kaplan 6·N·tokens figure is shown next to it)
and MFU against :func:`megatron_latentcot.flops.peak_tflops` (CPUs have no entry: MFU is null
unless ``--peak-tflops`` is given). Synthetic uniform-random token batches, one micro-batch per
step, vanilla Llama. CPU: fp32 "tiny" and "~100M"; CUDA: bf16 410M and 1.4B (paper shapes).

    python -m benchmarks.train_throughput [--quick] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import (
    backend_overrides,
    base_parser,
    build_context,
    configure_threads,
    count_parameters,
    format_table,
    free_memory,
    make_config,
    peak_memory_gib,
    resolve_device,
    shape_overrides,
    synthetic_microbatch,
    time_it,
    warn_if_busy,
    write_json,
)
from megatron_latentcot.flops import peak_tflops
from megatron_latentcot.parallel import ParallelContext
from megatron_latentcot.training.loop import Engine


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    micro_batch: int
    warmup: int
    repeats: int

    def overrides(self) -> list[str]:
        return shape_overrides(self.hidden, self.layers, self.heads, self.ffn, self.vocab,
                               self.seq, self.micro_batch) + ["latent.method=vanilla",
                                                              "train.lr_warmup_iters=0"]


CPU_SHAPES = [
    ModelShape("tiny", 256, 4, 4, 688, 8192, 256, 4, warmup=2, repeats=5),
    ModelShape("~100M", 768, 12, 12, 2048, 32000, 512, 1, warmup=1, repeats=5),
]
CPU_QUICK = [ModelShape("tiny", 256, 4, 4, 688, 8192, 256, 4, warmup=1, repeats=3)]
GPU_SHAPES = [
    ModelShape("410M", 1024, 24, 16, 2752, 50304, 2048, 4, warmup=3, repeats=10),
    ModelShape("1.4B", 2048, 24, 32, 5504, 50304, 2048, 2, warmup=3, repeats=10),
]
GPU_QUICK = [ModelShape("410M", 1024, 24, 16, 2752, 50304, 2048, 1, warmup=1, repeats=3)]


def bench_shape(shape: ModelShape, ctx: ParallelContext, args: argparse.Namespace,
                peak: float | None) -> dict[str, Any]:
    device = ctx.device
    free_memory(device)
    cfg = make_config(shape.overrides() + backend_overrides(device))
    engine = Engine(cfg, ctx, shape.vocab)
    counts = count_parameters(engine.model)
    mb = synthetic_microbatch(shape.micro_batch, shape.seq, shape.vocab, seed=0)
    losses: list[float] = []

    def step() -> dict[str, float]:
        out = engine.train_step([mb])
        losses.append(out["lm_loss"])
        return out

    warmup = args.warmup if args.warmup is not None else shape.warmup
    repeats = args.repeats if args.repeats is not None else shape.repeats
    timing, last = time_it(step, device, warmup, repeats)
    tokens = shape.micro_batch * shape.seq
    flops = last["flops"]
    tflops = flops / timing.median / 1e12
    kaplan = 6 * counts["params"] * tokens
    row = {
        "config": shape.name, **shape.__dict__, **counts, "precision": cfg.train.precision,
        "tokens_per_iter": tokens, "flops_per_iter": flops, "kaplan_6nd_flops_per_iter": kaplan,
        "s_per_iter": timing.median, "tokens_per_s": tokens / timing.median, "tflops": tflops,
        "mfu": tflops / peak if peak else None, "peak_mem_gib": peak_memory_gib(device),
        "loss_first": losses[0], "loss_last": losses[-1], "timing": timing.to_dict(),
    }
    return row


COLUMNS = [("config", "config", ""), ("params", "params", ",d"),
           ("precision", "prec", ""), ("tokens_per_iter", "tok/iter", ",d"),
           ("s_per_iter", "s/iter", ".3f"), ("tokens_per_s", "tok/s", ",.0f"),
           ("flops_per_iter", "FLOPs/iter", ".3e"), ("kaplan_6nd_flops_per_iter", "6ND/iter", ".3e"),
           ("tflops", "TFLOP/s", ".3f"), ("mfu_pct", "MFU %", ".1f"), ("spread", "spread", ".2f"),
           ("peak_mem_gib", "mem GiB", ".2f")]


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[0], "benchmarks/results/train_throughput.json")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of the device for MFU (CPUs have no built-in entry)")
    p.add_argument("--configs", default=None,
                   help="comma-separated subset of config names to run (e.g. tiny)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    threads = configure_threads(args.threads)
    if device.type == "cpu":
        warn_if_busy()
    ctx = build_context(device)
    shapes = ((GPU_QUICK if args.quick else GPU_SHAPES) if device.type == "cuda"
              else (CPU_QUICK if args.quick else CPU_SHAPES))
    if args.configs:
        wanted = set(args.configs.split(","))
        shapes = [s for s in shapes if s.name in wanted]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    print(f"train_step throughput on {device} ({name}), {threads} threads, peak TFLOP/s: {peak}")
    rows = []
    for shape in shapes:
        row = bench_shape(shape, ctx, args, peak)
        free_memory(device)  # the engine is gone with bench_shape's frame
        rows.append(row)
        print(f"  {shape.name}: {row['s_per_iter']:.3f} s/iter, {row['tokens_per_s']:,.0f} tok/s, "
              f"{row['tflops']:.3f} TFLOP/s, loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}",
              flush=True)
    table = [dict(r, mfu_pct=100 * r["mfu"] if r["mfu"] is not None else None,
                  spread=r["timing"]["spread"]) for r in rows]
    print()
    print(format_table(table, COLUMNS))
    path = write_json(args.out, "train_throughput", device, args,
                      {"peak_tflops": peak, "results": rows,
                       "notes": "FLOPs/iter: the engine's exact count (3 x forward, multiply-add = 2, "
                                "attention from visible pairs); s/iter: median over repeats; "
                                "spread: (max-min)/median of the repeats."})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
