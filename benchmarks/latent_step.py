"""Cost of the latent-step scheduler: forward + backward time per iteration against FLOPs.

Runs through ``Engine.run`` (forward + backward of one micro-batch, no optimizer step):

* ``vanilla`` (one pass),
* ``latent_fixed`` with K fixed: every token runs K passes; this IS the fixed-depth latent loop,
  the baseline compute an adaptive run must undercut,
* ``adaptive`` (K_max = 4, router and per-step p_target head included) with **forced** active
  sets: ``LatentStepScheduler._decide`` is replaced so that after step k a fixed fraction of the
  still-active tokens (an evenly strided subset) continues, like
  tests/test_latent_scheduler.py::test_flops_fall_with_active_tokens. The real router still runs
  (its gates feed reach/exit), only the continue decision is fixed.

FLOPs are the scheduler's own exact count (``stats()['flops']`` from
:func:`megatron_latentcot.flops.latent_train_flops`). For each adaptive schedule the report
gives ``time_ratio = t(adaptive) / t(latent_fixed K=4)``, ``flops_ratio`` likewise, and
``efficiency = time_ratio / flops_ratio`` (target <= 1.15 on CPU: saved FLOPs become saved
time). The attention-plan construction (``latent_plan``, ``causal_plan``, ``visible_pairs``) is
timed in separate instrumented iterations and reported as a fraction of the iteration.

    python -m benchmarks.latent_step [--quick] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

import megatron_latentcot.model.latent as latent_mod
from benchmarks.common import (
    backend_overrides,
    base_parser,
    build_context,
    configure_threads,
    format_table,
    free_memory,
    make_config,
    resolve_device,
    shape_overrides,
    synchronize,
    synthetic_microbatch,
    time_interleaved,
    warn_if_busy,
    write_json,
)
from megatron_latentcot.model.latent import LatentStepScheduler
from megatron_latentcot.model.router import Decision, route
from megatron_latentcot.parallel import ParallelContext
from megatron_latentcot.training.loop import Engine

K_MAX = 4


@dataclass(frozen=True)
class Setup:
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
                               self.seq, self.micro_batch)


SETUPS = {  # (device type, quick) -> setup
    ("cpu", False): Setup(512, 4, 8, 1376, 8192, 256, 4, warmup=1, repeats=5),
    ("cpu", True): Setup(256, 2, 4, 688, 8192, 128, 4, warmup=1, repeats=2),
    ("cuda", False): Setup(1024, 24, 16, 2752, 50304, 2048, 2, warmup=3, repeats=10),
    ("cuda", True): Setup(1024, 8, 16, 2752, 50304, 1024, 2, warmup=2, repeats=3),
}

# Fraction of the still-active tokens that continue after steps 1, 2, 3 (K_max = 4).
SCHEDULES: list[tuple[float, ...]] = [(1.0, 1.0, 1.0), (1.0, 0.5, 0.25), (0.5, 0.5, 0.5),
                                      (0.25, 0.25, 0.25)]
QUICK_SCHEDULES: list[tuple[float, ...]] = [(1.0, 1.0, 1.0), (1.0, 0.5, 0.25)]


def strided_keep(n: int, fraction: float, device: torch.device) -> torch.Tensor:
    """An evenly spread ~``fraction * n`` subset of ``n`` packed (row-major) slots."""
    idx = torch.arange(n, device=device, dtype=torch.float64)
    return torch.floor((idx + 1) * fraction) > torch.floor(idx * fraction)


def force_schedule(sched: LatentStepScheduler, fractions: Sequence[float]) -> None:
    """Replace ``sched._decide``: the router runs, but a fixed strided subset continues."""
    def decide(z: torch.Tensor, reach: torch.Tensor,
               k: int) -> tuple[Decision, torch.Tensor | None]:
        if k == sched.max_steps:
            return route(reach, None, 0.0), None
        gate = sched.stage.router(z)
        reach_next = reach * gate
        cont = strided_keep(reach.numel(), fractions[k - 1], reach.device)
        return Decision(exit=torch.where(cont, reach - reach_next, reach), reach_next=reach_next,
                        cont=cont), gate

    sched._decide = decide  # type: ignore[method-assign]


@contextmanager
def plan_timer(device: torch.device) -> Iterator[dict[str, float]]:
    """Time the scheduler's attention-plan bookkeeping (patched module globals, restored after)."""
    acc = {"latent_plan": 0.0, "causal_plan": 0.0, "visible_pairs": 0.0}
    originals = {name: getattr(latent_mod, name) for name in acc}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            synchronize(device)
            start = time.perf_counter()
            out = fn(*a, **kw)
            synchronize(device)
            acc[name] += time.perf_counter() - start
            return out
        return wrapper

    for name, fn in originals.items():
        setattr(latent_mod, name, timed(name, fn))
    try:
        yield acc
    finally:
        for name, fn in originals.items():
            setattr(latent_mod, name, fn)


def plan_cost(iteration: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """One instrumented iteration: seconds spent building attention plans, and its wall time."""
    with plan_timer(device) as acc:
        synchronize(device)
        start = time.perf_counter()
        iteration()
        synchronize(device)
        wall = time.perf_counter() - start
    return {"plan_s": sum(acc.values()), "plan_detail_s": dict(acc), "instrumented_s": wall}


def build_engine(ctx: ParallelContext, setup: Setup, method: str, k: int) -> Engine:
    cfg = make_config(setup.overrides() + backend_overrides(ctx.device)
                      + [f"latent.method={method}", f"latent.max_steps={k}"])
    return Engine(cfg, ctx, setup.vocab)


def fmt_schedule(fractions: Sequence[float]) -> str:
    return "/".join(f"{f:g}" for f in fractions)


COLUMNS = [("run", "run", ""), ("active", "active frac/step", ""), ("slots", "slots", ",d"),
           ("s_per_iter", "s/iter", ".3f"), ("spread", "spread", ".2f"), ("flops", "FLOPs", ".3e"),
           ("tflops", "TFLOP/s", ".3f"), ("time_ratio", "t/t_fixed4", ".3f"),
           ("flops_ratio", "F/F_fixed4", ".3f"), ("efficiency", "(t/t4)/(F/F4)", ".3f"),
           ("efficiency_best", "same, best", ".3f"),
           ("plan_ms", "plan ms", ".1f"), ("plan_pct", "plan %", ".2f")]


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[0], "benchmarks/results/latent_step.json")
    p.add_argument("--target", type=float, default=1.15,
                   help="largest acceptable (time ratio / FLOPs ratio) for adaptive runs")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    threads = configure_threads(args.threads)
    if device.type == "cpu":
        warn_if_busy()
    ctx = build_context(device)
    setup = SETUPS[(device.type, args.quick)]
    schedules = QUICK_SCHEDULES if args.quick else SCHEDULES
    mb = synthetic_microbatch(setup.micro_batch, setup.seq, setup.vocab, seed=0)
    print(f"latent-step forward+backward on {device}, {threads} threads, K_max={K_MAX}, "
          f"{setup}", flush=True)

    runs: list[tuple[str, str, int, tuple[float, ...] | None]] = [
        ("vanilla", "vanilla", 1, None),
        ("latent_fixed K=2", "latent_fixed", 2, None),
        (f"latent_fixed K={K_MAX}", "latent_fixed", K_MAX, None)]
    runs += [(f"adaptive {fmt_schedule(s)}", "adaptive", K_MAX, s) for s in schedules]
    if args.quick:
        runs = [r for r in runs if r[0] != "latent_fixed K=2"]
    engines = {key: build_engine(ctx, setup, *key) for key in dict.fromkeys((m, k) for _, m, k, _ in runs)}

    def iteration_of(method: str, k: int, schedule: tuple[float, ...] | None) -> Callable[[], Any]:
        engine = engines[(method, k)]

        def iteration() -> dict[str, float]:
            if schedule is not None:  # the adaptive engine is shared by all schedules
                force_schedule(engine.scheduler, schedule)
            stats = engine.run([mb], forward_only=False)
            engine.optimizer.zero_grad()
            return stats[0]
        return iteration

    iterations = {label: iteration_of(m, k, s) for label, m, k, s in runs}
    warmup = args.warmup if args.warmup is not None else setup.warmup
    repeats = args.repeats if args.repeats is not None else setup.repeats
    warmup = max(warmup, 1)  # the first (untimed) round also times the plan construction
    print(f"timing {len(runs)} runs round-robin: {warmup} warmup (plan timing) + {repeats} timed "
          "rounds", flush=True)
    plans = {label: plan_cost(fn, device) for label, fn in iterations.items()}
    timed = time_interleaved(iterations, device, warmup - 1, repeats)
    rows: list[dict[str, Any]] = []
    for label, method, k, schedule in runs:
        timing, stats = timed[label]
        fracs = [stats[f"active_frac_step{i}"] for i in range(1, k + 1)]
        row = {"run": label, "method": method, "k_max": k,
               "schedule": list(schedule) if schedule else None,
               "s_per_iter": timing.median, "timing": timing.to_dict(), "flops": stats["flops"],
               "tflops": stats["flops"] / timing.median / 1e12, "mean_steps": stats["mean_steps"],
               "active_frac": fracs, "slots": round(sum(fracs) * stats["tokens"]),
               **plans[label], "plan_frac": plans[label]["plan_s"] / timing.median}
        rows.append(row)
        print(f"  {label}: {row['s_per_iter']:.3f} s/iter, {row['flops']:.3e} FLOPs, active "
              f"{[round(f, 3) for f in fracs]}, plan {100 * row['plan_frac']:.2f}%", flush=True)
    engines.clear()
    free_memory(device)

    base = next(r for r in rows if r["method"] == "latent_fixed" and r["k_max"] == K_MAX)
    for r in rows:
        r["time_ratio"] = r["s_per_iter"] / base["s_per_iter"]
        r["flops_ratio"] = r["flops"] / base["flops"]
        r["efficiency"] = r["time_ratio"] / r["flops_ratio"]
        r["efficiency_best"] = r["timing"]["best"] / base["timing"]["best"] / r["flops_ratio"]
        if r["method"] == "adaptive":
            r["within_target"] = r["efficiency"] <= args.target
    table = [dict(r, active="/".join(f"{f:.3f}" for f in r["active_frac"]),
                  spread=r["timing"]["spread"], plan_ms=1e3 * r["plan_s"],
                  plan_pct=100 * r["plan_frac"]) for r in rows]
    print()
    print(format_table(table, COLUMNS))
    adaptive = [r for r in rows if r["method"] == "adaptive"]
    worst = max(r["efficiency"] for r in adaptive)
    verdict = "OK" if all(r["within_target"] for r in adaptive) else "ABOVE TARGET"
    print(f"\nadaptive (t/t4)/(F/F4): worst {worst:.3f} (target <= {args.target}): {verdict}")
    path = write_json(args.out, "latent_step", device, args, {
        "setup": setup.__dict__, "k_max": K_MAX, "target": args.target, "baseline": base["run"],
        "worst_efficiency": worst, "results": rows,
        "notes": "s/iter: median forward+backward (Engine.run, no optimizer step); FLOPs: the "
                 "scheduler's exact count; active frac: live tokens per step / B*T; slots: "
                 "token-slots run over all steps; runs are timed round-robin; efficiency_best uses the "
                 "fastest repeat instead of the median; plan: latent_plan + causal_plan + "
                 "visible_pairs per iteration, timed in the first (warmup) round; plan % = plan_s / "
                 "median s/iter."})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
