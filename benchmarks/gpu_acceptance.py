"""GPU acceptance: the first thing to run on a GPU; each check passes or fails against a bound.

    bash benchmarks/gpu_acceptance.sh               # one GPU, under 8 minutes
    bash benchmarks/gpu_acceptance.sh --cpu-smoke   # tiny shapes on CPU (CI runs it)

Checks (issue 22, item 5); ``--cpu-smoke`` runs each at tiny size and still asserts it:

* ``a_flex_vs_sdpa``: flex attention (compiled on CUDA) against SDPA on random 2-D-rule plans
  (several documents per row, GQA, compacted / uncompacted with dead keys / padded steps),
  forward and backward (CPU: forward only, flex has no CPU backward): max relative error
  (``max|flex - sdpa| / max|sdpa|`` per tensor) below 2e-3 in fp32 and 3e-2 in bf16; graphs
  compiled per dtype at most 3 however many widths the plans have (CUDA).
* ``b_throughput``: a 410M Llama (examples/configs/410m_vanilla.yaml shape) in bf16: vanilla
  tokens/s and MFU (at least 40%); adaptive K=4 with forced active-fraction schedules, time
  ratio / FLOPs ratio against latent_fixed K=4 at most 1.3; peak memory of a training step
  within 10% of the planner (``megatron_latentcot.plan``; CPU: tensor allocations seen by the
  profiler, within the 20% the planner's CPU test uses).
* ``c_fsdp2_reduce``: the FSDP2 reduce path (``optimizer.shard_model`` +
  ``reduce_sharded_grads``) at world size 1 gives the plain gradients (fp32, max relative
  error at most 1e-6).
* ``d_resume``: a synthetic corpus -> tokenizer -> ``tools/preprocess_data.py`` -> pretrain
  (bf16, flex on CUDA) saving at iteration 10 -> resume to 20: the losses equal an
  uninterrupted run's (bit for bit; on CUDA within twice the run-to-run noise of two
  uninterrupted runs, which is reported).
* ``e_methods_flex``: adaptive (compacted and not), latent_fixed, ponderlm2 and mor, whole
  model in fp32 with two documents per row: flex against SDPA on the same weights, loss (and on
  CUDA every gradient: compiled flex reading the in-place K/V store's strided views) within
  the fp32 bound of ``a_flex_vs_sdpa``.

The JSON (``benchmarks/results/gpu_acceptance.json``; ``--cpu-smoke``:
``gpu_acceptance_cpu_smoke.json``) is rewritten after every check, so a crash or a timeout
still leaves the checks done so far; a check that raises is recorded as failed with its error.
Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import random
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    REPO_ROOT,
    backend_overrides,
    base_parser,
    build_context,
    configure_threads,
    free_memory,
    make_config,
    resolve_device,
    shape_overrides,
    synchronize,
    synthetic_microbatch,
    time_interleaved,
    time_it,
    write_json,
)
from megatron_latentcot.parallel import ParallelContext

FLEX_TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}
MAX_GRAPHS = 3
MFU_GOAL = 0.40
RATIO_BOUND = 1.3
MEMORY_TOL = {"cuda": 0.10, "cpu": 0.20}
FSDP_TOL = 1e-6
SCHEDULES = [(1.0, 0.5, 0.25), (0.5, 0.5, 0.5)]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every shape of one mode."""

    attn_rows: int
    attn_seq: int
    attn_heads: tuple[int, int, int]  # query heads, K/V heads, head dim
    attn_seeds: int
    model: tuple[int, int, int, int, int, int, int]  # hidden, layers, heads, ffn, vocab, seq, mb
    adaptive_micro_batch: int
    warmup: int
    repeats: int
    fsdp_model: tuple[int, int, int, int, int, int, int]
    resume_model: tuple[int, int, int, int, int, int, int]
    resume_vocab: int
    method_model: tuple[int, int, int, int, int, int, int]


GPU = Sizes(attn_rows=4, attn_seq=1000, attn_heads=(16, 4, 64), attn_seeds=2,
            model=(1024, 24, 16, 2752, 50304, 2048, 4), adaptive_micro_batch=2, warmup=3,
            repeats=8, fsdp_model=(512, 4, 8, 1376, 8192, 512, 2),
            resume_model=(256, 4, 4, 688, 0, 256, 4), resume_vocab=2048,
            method_model=(256, 4, 8, 688, 2048, 1000, 2))
CPU_SMOKE = Sizes(attn_rows=2, attn_seq=45, attn_heads=(4, 2, 16), attn_seeds=1,
                  model=(64, 2, 4, 160, 512, 64, 2), adaptive_micro_batch=2, warmup=1, repeats=2,
                  fsdp_model=(64, 2, 4, 160, 512, 32, 2),
                  resume_model=(64, 2, 4, 160, 0, 64, 4), resume_vocab=320,
                  method_model=(64, 4, 4, 160, 512, 45, 2))


def criterion(what: str, value: float | None, op: str, bound: float) -> dict[str, Any]:
    """One pass/fail line: ``value op bound`` (``<=`` or ``>=``); a missing value fails."""
    ok = value is not None and value == value and (value <= bound if op == "<=" else value >= bound)
    return {"what": what, "value": value, "bound": f"{op} {bound:g}", "passed": bool(ok)}


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max|got - want| / max|want|`` in float64 (0 when both are all zeros)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


# -- (a) flex against SDPA ----------------------------------------------------------------------

def random_plan_args(seed: int, rows: int, seq: int, k_max: int, mode: str) -> list[tuple]:
    """``latent_plan`` arguments (``None`` for the token pass) of every step of one random
    micro-batch: several documents per row, rows halting at different steps; ``mode``:
    ``compact`` (survivors only), ``uncompact`` (every slot runs, halted ones dead keys) or
    ``padded`` (three dead slots repeating the last survivor, as sequence parallelism pads).
    Returns ``(q_slots, k_slots, k_live, doc_ids, n_padding)`` per later step."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.cumsum(torch.rand(rows, seq, generator=g) < 0.02, dim=1)
    steps = torch.randint(1, k_max + 1, (rows, seq), generator=g).reshape(-1)
    slots = torch.arange(rows * seq)
    out: list[tuple] = [(None, None, None, doc, 0)]
    keys, live = slots, torch.ones(rows * seq, dtype=torch.bool)
    for k in range(2, k_max + 1):
        alive = steps >= k
        pad = 0
        if mode == "uncompact":
            q, q_live = slots, alive
        else:
            q, q_live = slots[alive], torch.ones(int(alive.sum()), dtype=torch.bool)
            if mode == "padded" and q.numel():
                pad = 3
                q = torch.cat([q, q[-1:].repeat(pad)])
                q_live = torch.cat([q_live, torch.zeros(pad, dtype=torch.bool)])
        keys, live = torch.cat([keys, q]), torch.cat([live, q_live])
        out.append((q, keys, None if mode == "compact" else live, doc, pad))
    return out


def _plan(args: tuple, rows: int, seq: int, backend: str, device: torch.device):
    from megatron_latentcot.model.attention import causal_plan, latent_plan

    q, k, live, doc, _ = args
    doc = doc.to(device)
    if q is None:
        return causal_plan(rows, seq, doc, backend)
    return latent_plan(q.to(device), k.to(device), None if live is None else live.to(device),
                       rows, seq, doc, backend)


def _attend(plan, q, k, v, grad, backward: bool) -> list[torch.Tensor]:
    from megatron_latentcot.model.attention import attention

    q, k, v = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
    out = attention(q, k, v, plan)
    if not backward:
        return [out.detach()]
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def check_flex(sizes: Sizes, device: torch.device, compile_cpu: bool) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    from megatron_latentcot.model import attention as attn

    rows, seq, (hq, hkv, d) = sizes.attn_rows, sizes.attn_seq, sizes.attn_heads
    backward = device.type == "cuda"  # FlexAttention has no backward on CPU
    compiled = device.type == "cuda" or compile_cpu
    dtypes = [torch.float32, torch.bfloat16]
    names = ["out", "dq", "dk", "dv"] if backward else ["out"]
    crits, detail = [], {}
    old_compile = attn.COMPILE_ON_CPU
    attn.COMPILE_ON_CPU = compile_cpu
    stack = contextlib.ExitStack()
    try:
        if not compiled:  # eager flex on CPU warns at every call that it is not compiled
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore", UserWarning)
        for dtype in dtypes:
            torch._dynamo.reset()
            attn._compiled_flex = None
            start = counters["stats"]["unique_graphs"]
            worst = dict.fromkeys(names, 0.0)
            widths, plans = set(), 0
            g = torch.Generator().manual_seed(0)
            for seed in range(sizes.attn_seeds):
                for mode in ("compact", "uncompact", "padded"):
                    for args in random_plan_args(seed, rows, seq, 4, mode):
                        flex = _plan(args, rows, seq, "flex", device)
                        sdpa = _plan(args, rows, seq, "sdpa", device)
                        nq = rows * seq if args[0] is None else args[0].numel()
                        nk = rows * seq if args[0] is None else args[1].numel()
                        if nq == 0:
                            continue
                        q = torch.randn(nq, hq, d, generator=g).to(device, dtype)
                        k = torch.randn(nk, hkv, d, generator=g).to(device, dtype)
                        v = torch.randn(nk, hkv, d, generator=g).to(device, dtype)
                        grad = torch.randn(nq, hq * d, generator=g).to(device, dtype)
                        real = torch.ones(nq, dtype=torch.bool, device=device)
                        if args[4]:  # padding queries: excluded, and no gradient from them
                            real[nq - args[4]:] = False
                            grad[~real] = 0
                        got = _attend(flex, q, k, v, grad, backward)
                        want = _attend(sdpa, q, k, v, grad, backward)
                        for i, name in enumerate(names):
                            a, b = (got[i][real], want[i][real]) if name in ("out", "dq") \
                                else (got[i], want[i])
                            worst[name] = max(worst[name], max_rel_err(a, b))
                        widths.add(tuple(attn.row_layout(flex, attn.BLOCK).k_pos.shape))
                        plans += 1
            graphs = counters["stats"]["unique_graphs"] - start
            tag = "fp32" if dtype == torch.float32 else "bf16"
            for name in names:
                crits.append(criterion(f"{tag} {name} max rel err", worst[name], "<=",
                                       FLEX_TOL[dtype]))
            if compiled:
                crits.append(criterion(f"{tag} graphs compiled over {len(widths)} widths",
                                       float(graphs), "<=", MAX_GRAPHS))
            detail[tag] = {"plans": plans, "distinct_widths": len(widths), "graphs": graphs,
                           "max_rel_err": worst}
    finally:
        stack.close()
        attn.COMPILE_ON_CPU = old_compile
        attn._compiled_flex = None
    notes = ("forward and backward" if backward else
             "forward only: FlexAttention has no backward on CPU") + \
        (", compiled flex" if compiled else ", eager flex")
    return {"criteria": crits, "detail": dict(detail, shape={"rows": rows, "seq": seq,
                                                              "heads": hq, "kv_heads": hkv,
                                                              "head_dim": d}, notes=notes)}


# -- (b) throughput, adaptive cost, memory --------------------------------------------------------

def _engine(ctx: ParallelContext, shape: tuple, extra: list[str], precision: str,
            backend: str):
    from megatron_latentcot.training.loop import Engine

    hidden, layers, heads, ffn, vocab, seq, mb = shape
    cfg = make_config(shape_overrides(hidden, layers, heads, ffn, vocab, seq, mb)
                      + backend_overrides(ctx.device)
                      + [f"train.precision={precision}", f"latent.attention_backend={backend}",
                         "train.lr_warmup_iters=0", "parallel.zero=none", *extra])
    return Engine(cfg, ctx, vocab)


def _profiled_peak(fn: Callable[[], Any]) -> int:
    """CPU: peak bytes of tensor allocations while ``fn`` runs, above what was live before."""
    from benchmarks.attention import peak_bytes

    return peak_bytes(fn)[0]


def _static_bytes(engine) -> int:
    """Parameters and AdamW states (what the planner counts as weights + states)."""
    n = sum(p.untyped_storage().nbytes() for p in engine.model.parameters())
    return n + sum(v.untyped_storage().nbytes() for st in engine.optimizer.optimizer.state.values()
                   for v in st.values() if torch.is_tensor(v) and v.dim() > 0)


def _vanilla(sizes: Sizes, ctx: ParallelContext, precision: str,
             backend: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Vanilla tokens/s and MFU; peak memory of a whole training step against the planner."""
    from megatron_latentcot import plan as planner
    from megatron_latentcot.flops import peak_tflops

    device = ctx.device
    _, _, _, _, vocab, seq, mb = sizes.model
    engine = _engine(ctx, sizes.model, ["latent.method=vanilla"], precision, backend)
    batch = synthetic_microbatch(mb, seq, vocab, seed=0)
    timing, last = time_it(lambda: engine.train_step([batch]), device, sizes.warmup,
                           sizes.repeats)
    tflops = last["flops"] / timing.median / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, None)
    mfu = tflops / peak if peak else None
    crits = [criterion("vanilla MFU", mfu, ">=", MFU_GOAL)] if device.type == "cuda" else []
    if device.type == "cuda":
        free_memory(device)  # resets the peak
        engine.train_step([batch])
        synchronize(device)
        measured = torch.cuda.max_memory_allocated(device)
        how = "torch.cuda.max_memory_allocated over one train_step"
    else:  # parameters + AdamW states, plus the step's allocations as the profiler sees them
        measured = _static_bytes(engine) + _profiled_peak(lambda: engine.train_step([batch]))
        how = "parameters + AdamW states + profiler peak of one train_step"
    planned = planner.stage_memory(engine.cfg, vocab, planner.Layout(1, 1, 1), 0).peak
    crits.append(criterion("peak memory / planner - 1 (abs)", abs(measured / planned - 1), "<=",
                           MEMORY_TOL[device.type]))
    detail = {"s_per_iter": timing.median, "tokens_per_s": mb * seq / timing.median,
              "tflops": tflops, "peak_tflops": peak, "mfu": mfu, "device_name": name,
              "flops_per_iter": last["flops"], "timing": timing.to_dict(),
              "memory": {"measured_bytes": measured, "planned_bytes": planned, "how": how}}
    return crits, detail


def _adaptive_cost(sizes: Sizes, ctx: ParallelContext, precision: str,
                   backend: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Forward + backward of adaptive K=4 under forced schedules against latent_fixed K=4."""
    from benchmarks.latent_step import force_schedule

    shape = (*sizes.model[:6], sizes.adaptive_micro_batch)
    batch = synthetic_microbatch(shape[6], shape[5], shape[4], seed=1)
    fixed = _engine(ctx, shape, ["latent.method=latent_fixed", "latent.max_steps=4"],
                    precision, backend)
    adaptive = _engine(ctx, shape, ["latent.method=adaptive", "latent.max_steps=4"], precision,
                       backend)

    def iteration(engine, schedule=None) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            if schedule is not None:
                force_schedule(engine.scheduler, schedule)
            stats = engine.run([batch], forward_only=False)
            engine.optimizer.zero_grad()
            return stats[0]
        return run

    base = "latent_fixed K=4"
    fns = {base: iteration(fixed)}
    fns.update({"adaptive " + "/".join(f"{f:g}" for f in s): iteration(adaptive, s)
                for s in SCHEDULES})
    timed = time_interleaved(fns, ctx.device, sizes.warmup, sizes.repeats)
    base_t, base_stats = timed[base]
    crits, rows = [], []
    for (label, (t, stats)), schedule in zip(timed.items(), [None, *SCHEDULES]):
        ratio = (t.median / base_t.median) / (stats["flops"] / base_stats["flops"])
        rows.append({"run": label, "s_per_iter": t.median, "flops": stats["flops"],
                     "mean_steps": stats["mean_steps"], "time_over_flops_ratio": ratio,
                     "timing": t.to_dict()})
        if schedule is None:
            continue
        # the schedule took effect: 1 + f1 + f1 f2 + f1 f2 f3 steps per token
        want = sum(math.prod(schedule[:i]) for i in range(len(schedule) + 1))
        crits.append(criterion(f"{label}: |mean steps - {want:g}|",
                               abs(stats["mean_steps"] - want), "<=", 0.02))
        if ctx.device.type == "cuda":  # tiny CPU shapes are overhead-bound: reported only
            crits.append(criterion(f"{label}: time ratio / FLOPs ratio", ratio, "<=",
                                   RATIO_BOUND))
    return crits, {"micro_batch": shape[6], "runs": rows,
                   "notes": "time ratio / FLOPs ratio against latent_fixed K=4 is a criterion "
                            "on CUDA only (CPU smoke: tiny, overhead-bound shapes; reported)"}


def check_throughput(sizes: Sizes, ctx: ParallelContext, precision: str,
                     backend: str) -> dict[str, Any]:
    detail: dict[str, Any] = {"shape": dict(zip(("hidden", "layers", "heads", "ffn", "vocab",
                                                 "seq", "micro_batch"), sizes.model)),
                              "precision": precision, "attention_backend": backend}
    crits, detail["vanilla"] = _vanilla(sizes, ctx, precision, backend)
    free_memory(ctx.device)
    more, detail["adaptive"] = _adaptive_cost(sizes, ctx, precision, backend)
    return {"criteria": crits + more, "detail": detail}


# -- (c) FSDP2's reduce path at world size 1 ------------------------------------------------------

def check_fsdp(sizes: Sizes, ctx: ParallelContext) -> dict[str, Any]:
    from megatron_latentcot.training.optimizer import reduce_sharded_grads, shard_model

    extra = ["latent.method=adaptive", "latent.max_steps=3", "latent.tau=0.3"]
    plain = _engine(ctx, sizes.fsdp_model, extra, "fp32", "sdpa")
    sharded = _engine(ctx, sizes.fsdp_model, extra, "fp32", "sdpa")
    names = [n for n, _ in plain.model.named_parameters()]
    batch = synthetic_microbatch(sizes.fsdp_model[6], sizes.fsdp_model[5], sizes.fsdp_model[4],
                                 seed=2)
    plain.run([batch], forward_only=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        units = shard_model(sharded.model, ctx)
        sharded.run([batch], forward_only=False)
        reduce_sharded_grads(units)
    grads = dict(sharded.model.named_parameters())
    worst, bitwise, missing = 0.0, True, []
    for name in names:
        want = dict(plain.model.named_parameters())[name].grad
        p = grads[name]
        got = None if p.grad is None else (p.grad.full_tensor() if hasattr(p.grad, "full_tensor")
                                           else p.grad)
        if (want is None) != (got is None):
            missing.append(name)
            continue
        if want is None:
            continue
        worst = max(worst, max_rel_err(got, want))
        bitwise = bitwise and torch.equal(got, want)
    crits = [criterion("max rel err of any gradient", worst, "<=", FSDP_TOL),
             criterion("parameters with a gradient on one path only", float(len(missing)), "<=",
                       0)]
    return {"criteria": crits, "detail": {"parameters": len(names), "units": len(units),
                                          "bitwise": bitwise, "missing": missing,
                                          "precision": "fp32",
                                          "warnings": sorted({str(w.message)[:300]
                                                              for w in caught})}}


# -- (d) preprocess -> pretrain -> save -> resume ------------------------------------------------

WORDS = ("the a state union people nation law year work tax school family plan power war peace "
         "growth energy health market freedom future history congress court vote rights job "
         "city river road price bank trade army justice hope").split()


def synthetic_corpus(path: Path, docs: int, seed: int = 0) -> None:
    """JSONL of ``docs`` documents of word-level Markov text (deterministic)."""
    rng = random.Random(seed)
    follow = {w: rng.sample(WORDS, 5) for w in WORDS}
    with path.open("w") as f:
        for _ in range(docs):
            w, words = rng.choice(WORDS), []
            for _ in range(rng.randint(40, 160)):
                words.append(w)
                w = rng.choice(follow[w]) if rng.random() < 0.85 else rng.choice(WORDS)
            f.write(json.dumps({"text": " ".join(words).capitalize() + "."}) + "\n")


def prepare_data(work: Path, vocab: int, docs: int) -> dict[str, str]:
    from megatron_latentcot.cli.preprocess_data import main as preprocess
    from megatron_latentcot.data.tokenizer_training import train_sentencepiece

    corpus = work / "corpus.jsonl"
    synthetic_corpus(corpus, docs)
    model = train_sentencepiece([corpus], work / "tok", vocab_size=vocab, num_threads=2)
    prefix = work / "corpus"
    rc = preprocess(["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer-type",
                     "sentencepiece", "--tokenizer-model", str(model), "--append-eod",
                     "--workers", "1"])
    if rc != 0:
        raise RuntimeError(f"preprocess_data exited with {rc}")
    return {"data": f"{prefix}_text_document", "tokenizer": str(model)}


def _pretrain(overrides: list[str], log: Path) -> dict[str, Any]:
    """One in-process run of the Trainer (its console output goes to ``log``)."""
    from megatron_latentcot.config import load_config
    from megatron_latentcot.training.loop import Trainer

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = Trainer(load_config(None, overrides)).train()
    log.write_text(out.getvalue())
    return result


def check_resume(sizes: Sizes, device: torch.device, precision: str, backend: str,
                 work: Path) -> dict[str, Any]:
    hidden, layers, heads, ffn, _, seq, mb = sizes.resume_model
    data = prepare_data(work, sizes.resume_vocab, 400)
    base = [f"model.hidden_size={hidden}", f"model.num_layers={layers}",
            f"model.num_attention_heads={heads}", "model.num_query_groups=2",
            f"model.ffn_hidden_size={ffn}", f"model.max_position_embeddings={seq}",
            f"data.seq_length={seq}", f"train.micro_batch_size={mb}",
            f"train.global_batch_size={2 * mb}", f"data.data_path=[{data['data']}]",
            "data.tokenizer_type=sentencepiece", f"data.tokenizer_model={data['tokenizer']}",
            "data.split=90,5,5", "latent.method=adaptive", "latent.max_steps=3",
            "latent.tau=0.3", f"latent.attention_backend={backend}",
            f"train.precision={precision}", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.lr_warmup_iters=3", "train.lr_decay_iters=20", "train.log_interval=5",
            "train.eval_iters=1", "train.eval_interval=0", "train.save_interval=10", "train.train_iters=20",
            *backend_overrides(device)[:1]]
    straight = _pretrain(base + [f"train.save={work / 'straight'}"], work / "straight.log")
    runs = {"straight": straight["losses"]}
    first = _pretrain(base + ["train.train_iters=10", f"train.save={work / 'resumed'}"],
                      work / "first.log")
    second = _pretrain(base + [f"train.save={work / 'resumed'}",
                               f"train.load={work / 'resumed'}"], work / "second.log")
    resumed = first["losses"] + second["losses"]
    runs["resumed"] = resumed
    noise = 0.0
    if device.type == "cuda":  # GPU kernels may not be bitwise repeatable: measure the floor
        again = _pretrain(base + [f"train.save={work / 'again'}"], work / "again.log")
        runs["straight_again"] = again["losses"]
        noise = max(abs(a - b) / abs(b) for a, b in zip(again["losses"], straight["losses"]))
    diff = (max(abs(a - b) / abs(b) for a, b in zip(resumed, straight["losses"]))
            if len(resumed) == len(straight["losses"]) else float("inf"))
    crits = [criterion("resumed iterations", float(len(second["losses"])), ">=", 10),
             criterion("resumed vs uninterrupted: max rel loss diff", diff, "<=", 2 * noise)]
    ok_losses = all(x == x for x in resumed)
    crits.append(criterion("finite losses", float(ok_losses), ">=", 1))
    return {"criteria": crits, "detail": {"losses": runs, "run_to_run_noise": noise,
                                          "resumed_from": second.get("iteration"),
                                          "precision": precision, "attention_backend": backend,
                                          "logs": str(work)}}


# -- driver -------------------------------------------------------------------------------------

def run_check(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one check; an exception is a failed check with its error, never a lost JSON."""
    print(f"== {name} ...", flush=True)
    start = time.perf_counter()
    try:
        out = fn()
        passed = bool(out["criteria"]) and all(c["passed"] for c in out["criteria"])
        rec = {"check": name, "passed": passed, **out, "error": None}
    except (Exception, KeyboardInterrupt) as e:  # recorded; KeyboardInterrupt: the time limit
        rec = {"check": name, "passed": False, "criteria": [], "detail": {},
               "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:],
               "interrupted": isinstance(e, KeyboardInterrupt)}
    rec["seconds"] = time.perf_counter() - start
    for c in rec["criteria"]:
        value = "-" if c["value"] is None else f"{c['value']:.4g}"
        print(f"   {'PASS' if c['passed'] else 'FAIL'}  {c['what']}: {value} (bound {c['bound']})",
              flush=True)
    if rec["error"]:
        print(f"   FAIL  {rec['error']}\n{rec['traceback']}", flush=True)
    print(f"== {name}: {'PASS' if rec['passed'] else 'FAIL'} in {rec['seconds']:.1f} s", flush=True)
    return rec


# -- (e) every latent method through flex ---------------------------------------------------------

METHOD_RUNS = {
    "adaptive": ["latent.method=adaptive", "latent.max_steps=3", "latent.tau=0.3"],
    "adaptive uncompacted": ["latent.method=adaptive", "latent.max_steps=3", "latent.tau=0.3",
                             "latent.compact=false"],
    "latent_fixed": ["latent.method=latent_fixed", "latent.max_steps=3"],
    "ponderlm2": ["latent.method=ponderlm2", "latent.max_steps=2"],
    "mor": ["latent.method=mor", "latent.max_steps=2", "mor.num_recursion=2"],
}


def check_methods_flex(sizes: Sizes, ctx: ParallelContext) -> dict[str, Any]:
    """Each method's whole-model loss (CUDA: and every gradient) with flex attention against
    SDPA, same weights, fp32, two documents per row. On CUDA this is compiled flex reading the
    latent loop's in-place K/V store through its strided views, backward included."""
    hidden, layers, heads, ffn, vocab, seq, rows = sizes.method_model
    batch = synthetic_microbatch(rows, seq, vocab, seed=3)
    batch["doc_ids"] = (torch.arange(seq) >= seq // 3).long().repeat(rows, 1)
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    backward = ctx.device.type == "cuda"
    tol = FLEX_TOL[torch.float32]
    crits, runs = [], []
    for name, extra in METHOD_RUNS.items():
        engine = _engine(ctx, sizes.method_model, extra, "fp32", "sdpa")
        stage, results = engine.model, {}
        for backend in ("sdpa", "flex"):
            stage.attention_backend = backend
            stage.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(backward):
                out = engine.scheduler.forward(batch)
                if backward:
                    out.loss.backward()
            grads = [p.grad.detach().clone() for p in stage.parameters() if p.grad is not None]
            results[backend] = (out.loss.detach(), grads, float(out.steps.float().mean()))
        (loss, grads, steps), (ref, ref_grads, ref_steps) = results["flex"], results["sdpa"]
        loss_err = max_rel_err(loss, ref)
        grad_err = max((max_rel_err(a, b) for a, b in zip(grads, ref_grads, strict=True)),
                       default=0.0)
        crits.append(criterion(f"{name}: loss max rel err", loss_err, "<=", tol))
        if backward:
            crits.append(criterion(f"{name}: gradients max rel err", grad_err, "<=", tol))
        runs.append({"method": name, "loss_rel_err": loss_err, "grad_rel_err": grad_err,
                     "mean_steps": steps, "mean_steps_sdpa": ref_steps, "loss": float(ref)})
        del engine
        free_memory(ctx.device)
    return {"criteria": crits, "detail": {
        "shape": dict(zip(("hidden", "layers", "heads", "ffn", "vocab", "seq", "rows"),
                          sizes.method_model)), "backward": backward, "runs": runs}}


CHECKS = ("a_flex_vs_sdpa", "b_throughput", "c_fsdp2_reduce", "d_resume", "e_methods_flex")


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0], "benchmarks/results/gpu_acceptance.json")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on the CPU (SDPA for training; CI runs this)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="training precision of b and d (default: bf16)")
    p.add_argument("--compile-cpu", action="store_true",
                   help="--cpu-smoke: compile flex on the CPU too (slower; counts graphs)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="checks not started by then are recorded as not run")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device = "cpu"
        if args.out == REPO_ROOT / "benchmarks/results/gpu_acceptance.json":
            args.out = REPO_ROOT / "benchmarks/results/gpu_acceptance_cpu_smoke.json"
    elif args.device is None:
        args.device = "cuda"  # the GPU run must not fall back silently
    if args.device == "cuda" and not torch.cuda.is_available():
        write_json(args.out, "gpu_acceptance", torch.device("cpu"), args, {
            "mode": "gpu", "passed": False, "checks": [],
            "error": "no CUDA device visible to torch (--cpu-smoke runs on the CPU)"})
        print(f"GPU acceptance: no CUDA device visible to torch; wrote {args.out}", flush=True)
        return 2
    device = resolve_device(args.device)
    configure_threads(args.threads)
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    precision = args.precision or "bf16"
    backend = "flex" if device.type == "cuda" else "sdpa"
    wanted = CHECKS if not args.only else tuple(args.only.split(","))
    unknown = set(wanted) - set(CHECKS)
    if unknown:
        p.error(f"--only: unknown checks {sorted(unknown)}; choose from {','.join(CHECKS)}")
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    print(f"GPU acceptance ({mode}) on {device}: precision {precision}, training attention "
          f"{backend}; writing {args.out}", flush=True)
    ctx = build_context(device)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()

    def save() -> None:
        write_json(args.out, "gpu_acceptance", device, args, {
            "mode": mode, "precision": precision, "attention_backend": backend,
            "passed": bool(records) and all(r["passed"] for r in records)
            and len(records) == len(wanted), "checks": records,
            "bounds": {"flex_max_rel_err": {"fp32": FLEX_TOL[torch.float32],
                                            "bf16": FLEX_TOL[torch.bfloat16]},
                       "max_graphs_per_dtype": MAX_GRAPHS, "vanilla_mfu_min": MFU_GOAL,
                       "adaptive_time_over_flops_ratio_max": RATIO_BOUND,
                       "memory_vs_planner": MEMORY_TOL[device.type],
                       "fsdp2_grad_max_rel_err": FSDP_TOL}})

    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_") as tmp:
        fns: dict[str, Callable[[], dict[str, Any]]] = {
            "a_flex_vs_sdpa": lambda: check_flex(sizes, device, args.compile_cpu),
            "b_throughput": lambda: check_throughput(sizes, ctx, precision, backend),
            "c_fsdp2_reduce": lambda: check_fsdp(sizes, ctx),
            "d_resume": lambda: check_resume(sizes, device, precision, backend, Path(tmp)),
            "e_methods_flex": lambda: check_methods_flex(sizes, ctx),
        }
        for name in wanted:
            if time.perf_counter() - start > args.budget_s:
                records.append({"check": name, "passed": False, "criteria": [], "detail": {},
                                "error": f"not run: over the {args.budget_s:g} s budget"})
            else:
                records.append(run_check(name, fns[name]))
                free_memory(device)
            save()
            if records[-1].get("interrupted"):
                break
    failed = [r["check"] for r in records if not r["passed"]]
    print(f"GPU acceptance ({mode}): {len(records) - len(failed)}/{len(records)} checks passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; wrote {args.out}",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
