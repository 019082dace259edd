"""Latent attention at the paper's shapes: the flex block mask, old vs new (build only, CPU).

For the 410M, 1.4B and 7B attention shapes (examples/configs/*_adaptive.yaml; T = 2048 / 4096,
micro-batch 2 to 8, K_max = 4, active fractions 1 / 0.9 / 0.6 / 0.3 of the tokens, random
nested survivors, documents of mean length 512 masked), every step's plan is built and:

* **new**: :func:`megatron_latentcot.model.attention.flex_block_mask` (row layout + block lists
  + ``BlockMask.from_kv_blocks``), timed (median of 5, one thread) and its peak allocation measured with
  the profiler's memory events; ``kept`` is what stays alive for the step's layers;
* **old**: ``create_block_mask`` over the packed (B*T) x (cache) grid, the previous
  implementation. It does not fit at these shapes (tens of GiB), so it is **measured at
  reduced shapes** (B = 1 and 2, T = 2048, the same fractions) and **extrapolated** with the
  measured bytes and seconds per grid pair (linear in pairs: both reduced shapes are reported);
* the step's GPU time at 40% MFU of 989 TFLOP/s: attention alone (forward + backward of every
  layer over the visible pairs) and the whole step (matmuls + attention), and the new build's
  share of each (build on CPU here: an upper bound for a GPU build);
* ``sdpa_mask``: the dense per-row boolean mask SDPA would build (the per-pair floor);
* the K/V copies each layer makes per step, forward (bf16 bytes read + written, at 4.8 TB/s of
  H200 HBM): the previous implementation's ``torch.cat`` of the packed cache with the step's
  keys, then flex's per-row copy of the cache, against the in-place cache that runs now
  (:class:`~megatron_latentcot.model.attention.KVStore`: it only writes the step's new keys);
  and the K/V bytes held for backward per micro-batch: every later step's row copy (old) against
  the one store per layer sized for every (t, k) slot (new, ``kv_cache``);
* a 50-iteration adaptive run of a small model with compiled flex on CPU (widths varying
  between iterations): the graphs compiled.

    python -m benchmarks.attention [--quick] [--out PATH]
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (
    base_parser,
    build_context,
    configure_threads,
    format_table,
    make_config,
    shape_overrides,
    warn_if_busy,
    write_json,
)
from megatron_latentcot.config import load_config
from megatron_latentcot.flops import PEAK_TFLOPS, attention_flops, layer_matmul_flops_per_token
from megatron_latentcot.model import attention as attn
from megatron_latentcot.model.attention import AttentionPlan, causal_plan, latent_plan, visible_pairs

FRACTIONS = (1.0, 0.9, 0.6, 0.3)
SHAPES = [("410m", 2048, 4), ("410m", 2048, 8), ("1.4b", 2048, 2), ("1.4b", 4096, 4),
          ("7b", 4096, 2), ("7b", 4096, 8)]
GPU_FLOPS = 0.4 * PEAK_TFLOPS["H100"] * 1e12  # 40% MFU of an H100/H200's dense bf16 peak
HBM = 4.8e12  # H200 bytes/s
DOC_LEN = 512


def step_plans(rows: int, seq: int, seed: int = 0) -> list[AttentionPlan]:
    """Every step's plan of one micro-batch: nested random survivors, documents masked."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.cumsum(torch.rand(rows, seq, generator=g) < 1 / DOC_LEN, dim=1)
    n = rows * seq
    active, keys = torch.arange(n), torch.arange(n)
    plans = [causal_plan(rows, seq, doc, "flex")]
    for frac in FRACTIONS[1:]:
        keep = int(round(frac * n))
        active = torch.sort(active[torch.randperm(active.numel(), generator=g)[:keep]]).values
        keys = torch.cat([keys, active])
        plans.append(latent_plan(active, keys, None, rows, seq, doc, "flex"))
    return plans


def peak_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak bytes allocated while ``fn`` runs (the profiler's allocation events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, out


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def old_block_mask(plan: AttentionPlan):
    """The previous implementation: the rule evaluated over the packed (B*T) x (cache) grid."""
    from torch.nn.attention.flex_attention import create_block_mask

    seq = plan.seq
    q_slots = plan.all_slots() if plan.dense else plan.q_slots
    k_slots = plan.all_slots() if plan.dense else plan.k_slots
    doc = plan.doc_ids

    def rule(b, h, qi, kj):
        qs, ks = q_slots[qi], k_slots[kj]
        return (qs // seq == ks // seq) & (ks % seq <= qs % seq) & (doc[qs] == doc[ks])

    return create_block_mask(rule, None, None, q_slots.numel(), k_slots.numel(), device="cpu")


def grid(plan: AttentionPlan) -> tuple[int, int]:
    n = plan.rows * plan.seq
    return (n, n) if plan.dense else (plan.q_slots.numel(), plan.k_slots.numel())


def old_rates(rows_list: tuple[int, ...], seq: int) -> list[dict[str, float]]:
    """The old build measured at reduced shapes: bytes and seconds per grid pair, per step."""
    out = []
    for rows in rows_list:
        for k, plan in enumerate(step_plans(rows, seq), start=1):
            nq, nk = grid(plan)
            build = functools.partial(old_block_mask, plan)
            peak, _ = peak_bytes(build)
            seconds = median_seconds(build, 1)
            out.append({"rows": rows, "seq": seq, "step": k, "pairs": nq * nk, "bytes": peak,
                        "seconds": seconds, "bytes_per_pair": peak / (nq * nk),
                        "seconds_per_pair": seconds / (nq * nk)})
    return out


def mask_row(name: str, seq: int, rows: int, k: int, plan: AttentionPlan, rates: dict[str, float],
             repeats: int) -> dict[str, Any]:
    cfg = load_config(f"examples/configs/{name}_adaptive.yaml").model
    nq, nk = grid(plan)

    def build():
        plan._cache.clear()
        return attn.flex_block_mask(plan)

    peak, (mask, lay) = peak_bytes(build)
    kept = sum(t.numel() * t.element_size() for t in (*mask.as_tuple()[2:], *vars(lay).values())
               if isinstance(t, torch.Tensor))
    seconds = median_seconds(build, repeats)
    pairs = visible_pairs(plan)
    attn_s = 3 * cfg.num_layers * attention_flops(cfg, pairs) / GPU_FLOPS
    step_s = attn_s + 3 * cfg.num_layers * layer_matmul_flops_per_token(cfg) * nq / GPU_FLOPS
    blocks = mask.kv_indices.numel()
    computed = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
    old_bytes = rates["bytes_per_pair"] * nq * nk
    kv_row = 2 * 2 * cfg.kv_heads * cfg.head_dim  # K and V, bf16, one cached slot
    cat = 0 if k == 1 else 2 * kv_row * nk  # read the old cache and the new keys, write all
    identity = plan.dense and lay.k_pos.shape[1] == seq  # step 1 at whole blocks: a view
    gather = 0 if identity else 2 * kv_row * lay.k_pos.numel()  # read, write the row copy
    append = 2 * kv_row * nq  # an in-place cache: write the new keys only
    return {"model": name, "seq": seq, "rows": rows, "step": k, "queries": nq, "keys": nk,
            "visible_pairs": pairs, "old_bytes": old_bytes,
            "old_s": rates["seconds_per_pair"] * nq * nk, "new_bytes": peak, "new_kept_bytes": kept,
            "new_s": seconds, "bytes_ratio": old_bytes / peak,
            "sdpa_mask_bytes": lay.q_pos.shape[0] * lay.q_pos.shape[1] * lay.k_pos.shape[1],
            "blocks": blocks, "blocks_computed": computed,
            "blocks_partial": int(mask.kv_num_blocks.sum()), "attn_gpu_s": attn_s,
            "step_gpu_s": step_s, "build_over_attn": seconds / attn_s,
            "build_over_step": seconds / step_s,
            "kv_copy_bytes": cfg.num_layers * (cat + gather),
            "kv_append_bytes": cfg.num_layers * append,
            "kv_copy_over_step": cfg.num_layers * (cat + gather) / HBM / step_s,
            # what the old layout kept for backward: the step's row copy of the whole cache
            "kv_held_old_bytes": 0 if k == 1 else cfg.num_layers * kv_row * lay.k_pos.numel(),
            "kv_store_bytes": cfg.num_layers * kv_row * rows * attn.latent_cache_columns(
                len(FRACTIONS), seq, "flex")}


KV_COLUMNS = [("model", "model", ""), ("seq", "T", ""), ("rows", "B", ""),
              ("moved_old", "K/V moved old", ".3g"), ("moved_new", "in place", ".3g"),
              ("moved_ratio", "ratio", ".1f"), ("held_old", "K/V held old", ".3g"),
              ("held_new", "store", ".3g"), ("held_ratio", "ratio", ".2f")]


def kv_cache_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape: K/V bytes moved and held for one micro-batch's forward, old vs in place
    (which zeroes its store once: unwritten columns are masked and must be finite)."""
    out = []
    for key in dict.fromkeys((r["model"], r["seq"], r["rows"]) for r in rows):
        steps = [r for r in rows if (r["model"], r["seq"], r["rows"]) == key]
        moved_old = sum(r["kv_copy_bytes"] for r in steps)
        held_old = sum(r["kv_held_old_bytes"] for r in steps)
        store = steps[0]["kv_store_bytes"]
        moved_new = store + sum(r["kv_append_bytes"] for r in steps)  # zeroed once, then writes
        out.append({"model": key[0], "seq": key[1], "rows": key[2], "moved_old": moved_old,
                    "moved_new": moved_new, "moved_ratio": moved_old / moved_new,
                    "held_old": held_old, "held_new": store, "held_ratio": held_old / store})
    return out


def compiled_run(iterations: int, seq: int = 300) -> dict[str, Any]:
    """Graphs compiled by flex over an adaptive run whose widths vary between iterations."""
    from torch._dynamo.utils import counters

    from megatron_latentcot.model.latent import LatentStepScheduler
    from megatron_latentcot.model.llama import LlamaStage, init_weights

    device = torch.device("cpu")
    cfg = make_config(shape_overrides(32, 2, 4, 48, 96, seq, 2) + [
        "model.num_query_groups=2", "latent.method=adaptive", "latent.max_steps=4",
        "latent.attention_backend=flex"])
    ctx = build_context(device)
    stage = LlamaStage(cfg, ctx, 96)
    init_weights(stage, cfg.model, seed=0)
    sched = LatentStepScheduler(stage, cfg)
    widths, real = set(), attn.flex_block_mask

    def spy(plan, block):
        mask, lay = real(plan, block)
        widths.add(mask.seq_lengths)
        return mask, lay

    attn.COMPILE_ON_CPU, attn.flex_block_mask = True, spy
    torch._dynamo.reset()
    start, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
    g = torch.Generator().manual_seed(0)
    try:
        for it in range(iterations):
            cfg.latent.tau = (0.05, 0.3, 0.45, 0.2)[it % 4]
            data = torch.randint(0, 96, (2, seq + 1), generator=g)
            mb = {"tokens": data[:, :-1], "labels": data[:, 1:],
                  "loss_mask": torch.ones(2, seq), "doc_ids": (torch.arange(seq) >= seq // 3
                                                               ).long().repeat(2, 1)}
            with torch.no_grad():
                sched.forward(mb)
    finally:
        attn.COMPILE_ON_CPU, attn.flex_block_mask = False, real
    return {"iterations": iterations, "seq": seq, "rows": 2, "distinct_widths": len(widths),
            "graphs": counters["stats"]["unique_graphs"] - start,
            "seconds": time.perf_counter() - t0}


COLUMNS = [("model", "model", ""), ("seq", "T", "d"), ("rows", "B", "d"), ("step", "k", "d"),
           ("old_bytes", "old bytes", ".3g"), ("new_bytes", "new bytes", ".3g"),
           ("bytes_ratio", "old/new", ".0f"), ("sdpa_mask_bytes", "sdpa mask", ".3g"),
           ("old_s", "old s", ".3g"), ("new_s", "new s", ".3g"),
           ("attn_gpu_s", "attn GPU s", ".3g"), ("build_over_attn", "new/attn", ".3f"),
           ("build_over_step", "new/step", ".3f"), ("blocks_computed", "blocks run", "d"),
           ("blocks_partial", "partial", "d"), ("kv_copy_bytes", "K/V copied", ".3g"),
           ("kv_append_bytes", "append", ".3g"), ("kv_copy_over_step", "copy/step", ".3f")]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], "benchmarks/results/attention.json")
    args = p.parse_args()
    configure_threads(args.threads or 1)  # the builder is many small ops: one thread is steadier
    warn_if_busy()
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = args.repeats or (1 if args.quick else 5)
    reduced = old_rates((1,) if args.quick else (1, 2), 2048)
    rates = {r["step"]: r for r in reduced if r["rows"] == max(x["rows"] for x in reduced)}
    rows = []
    for name, seq, mb in shapes:
        for k, plan in enumerate(step_plans(mb, seq), start=1):
            rows.append(mask_row(name, seq, mb, k, plan, rates[k], repeats))
            print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    run = compiled_run(8 if args.quick else 50)
    kv = kv_cache_rows(rows)
    print(format_table(rows, COLUMNS))
    print(format_table(kv, KV_COLUMNS))
    print(f"compiled flex, adaptive run: {run}")
    path = write_json(args.out, "attention", torch.device("cpu"), args, {
        "notes": "old = create_block_mask over the packed grid, extrapolated from the reduced "
                 "shapes in old_reduced (bytes and seconds per grid pair of the larger one); new "
                 "measured at full shape (peak allocation, median build time on CPU). GPU times "
                 "are estimates: FLOPs / (0.4 * 989 TFLOP/s), forward + backward, every layer.",
        "fractions": list(FRACTIONS), "doc_len": DOC_LEN, "old_reduced": reduced, "rows": rows,
        "min_bytes_ratio": min(r["bytes_ratio"] for r in rows), "kv_cache": kv,
        "compiled_run": run})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
