"""Plan a run before launching it: parameters, memory per GPU, FLOPs and time per iteration.

``python -m megatron_latentcot.plan --config examples/configs/7b_adaptive.yaml --nodes 4 \
--gpus-per-node 8 parallel.tensor_model_parallel_size=8``

Everything follows the code, not a textbook formula:

- **Parameters**: the exact shapes :class:`~megatron_latentcot.model.llama.LlamaStage` creates on
  each (pipeline stage, tensor rank) -- fused QKV / gate-up, untied head, router (adaptive),
  pause embeddings (pause). Tests compare names and shapes with the real module.
- **Static memory**: fp32 master weights, fp32 gradients and AdamW's two fp32 states, sharded
  over data parallel by FSDP2 (``parallel.zero=fsdp2``; dim-0 shards, rounded up). FSDP2 here
  keeps each unit gathered through forward and backward (``reshard_after_forward=False``), so a
  full fp32 copy of the stage's weights is resident during a step, and with gradient
  accumulation it accumulates *unsharded* gradients.
- **Activations**: the bytes autograd saves for backward per micro-batch, op by op as the model
  runs them (residual stream and norms in fp32, matmul outputs in the compute dtype), for every
  latent step at its active-token count, including the latent loop's in-place K/V cache as
  built (``model.attention.KVStore``: one per layer and micro-batch, every (t, k) slot, read in
  place by the later steps) and, for the ``sdpa`` backend, the gathered queries and the dense
  (queries x cached keys) mask; for ``flex``, the per-row copies of Q/output at whole-block
  widths and one block mask per pass as built (``model.attention.flex_mask_bytes``: integers
  per block, MiB where a dense mask is GiB). Recompute keeps block inputs and the K/V store
  the later steps read. Under PP the peak is
  priced on the pipeline schedule itself (``training/schedules.py``): the largest set of
  (micro-batch, step) units alive on a stage as a backward starts, each at its own step's
  bytes -- K PP - s units (PP - s/K micro-batches' worth) under ``1f1b``, all M under ``gpipe``.
  The ``sdpa`` terms are checked against what autograd saves on CPU (tests/test_plan.py);
  flex's saved tensors cannot be (no backward on CPU), its block masks and K/V store are
  checked against a real flex forward.
- **FLOPs**: :mod:`megatron_latentcot.flops` on the step profile (default: every token runs
  K_max steps, the upper bound), plus the paper's 6 N per (token, pass) convention.
- **Time**: FLOPs per iteration / (GPUs x peak x MFU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_latentcot import flops
from megatron_latentcot.config import (
    Config,
    ConfigError,
    layout_refusal,
    load_config,
    mor_base_depth,
    mor_capacities,
)

GiB = 2**30
FP32 = 4
INDEX = 8  # int64


# -- layout ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    gpus_per_node: int | None = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def nodes(self) -> int | None:
        return None if not self.gpus_per_node else math.ceil(self.world / self.gpus_per_node)


def make_layout(cfg: Config, world_size: int | None = None, nodes: int | None = None,
                gpus_per_node: int | None = None) -> Layout:
    """TP and PP from the config; DP = world / (TP x PP). Without a world size, DP = 1."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if world_size is None and nodes is not None:
        if gpus_per_node is None:
            raise ConfigError("--nodes needs --gpus-per-node")
        world_size = nodes * gpus_per_node
    world_size = world_size or tp * pp
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor x pipeline parallel "
                          f"size {tp} x {pp}")
    return Layout(tp, pp, world_size // (tp * pp), gpus_per_node)


# -- parameters ------------------------------------------------------------------------------

def stage_layer_ids(cfg: Config, pp_rank: int) -> list[int]:
    """Global layer indices of pipeline stage ``pp_rank`` (as model.llama.stage_layers)."""
    m, par = cfg.model, cfg.parallel
    if cfg.latent.method == "mor":  # PP = 1: its physical layers (first, shared block, last)
        return list(range(2 + mor_base_depth(m.num_layers, cfg.mor.num_recursion)))
    counts = par.pipeline_layers or [m.num_layers // par.pipeline_model_parallel_size] * \
        par.pipeline_model_parallel_size
    start = sum(counts[:pp_rank])
    return list(range(start, start + counts[pp_rank]))


def stage_param_shapes(cfg: Config, vocab: int, tp: int, pp_rank: int) -> dict[str, tuple[int, ...]]:
    """Name -> local shape of every parameter one (stage, tensor rank) of LlamaStage holds."""
    m, lat = cfg.model, cfg.latent
    pp = cfg.parallel.pipeline_model_parallel_size
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if pp_rank == 0:
        shapes["embed_tokens.weight"] = (vocab // tp, h)
        if lat.method == "pause":
            shapes["pause_embeddings.weight"] = (lat.max_steps - 1, h)
    for i in stage_layer_ids(cfg, pp_rank):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.qkv_proj.weight"] = ((m.num_attention_heads + 2 * m.kv_heads) * d // tp, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, m.num_attention_heads * d // tp)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * f // tp, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f // tp)
    if pp_rank == pp - 1:
        shapes["norm.weight"] = (h,)
        if not m.tie_embeddings:
            shapes["lm_head.weight"] = (vocab // tp, h)
        if lat.method == "adaptive":
            shapes["router.weight"] = (1, h)
            shapes["router.bias"] = (1,)
    if lat.method == "mor":  # N_r 1-output routers (expert) or one N_r-output router (token)
        shapes["mor_router.weight"] = (cfg.mor.num_recursion, h)
    return shapes


_TP_SHARDED = ("embed_tokens.", "qkv_proj.", "o_proj.", "gate_up_proj.", "down_proj.", "lm_head.")


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def total_params(cfg: Config, vocab: int) -> int:
    """Distinct parameters of the whole model (TP shards counted once, replicas once)."""
    return sum(numel(shape) for s in range(cfg.parallel.pipeline_model_parallel_size)
               for shape in stage_param_shapes(cfg, vocab, 1, s).values())


def non_embedding_params(cfg: Config, vocab: int) -> int:
    m = cfg.model
    emb = vocab * m.hidden_size * (1 if m.tie_embeddings else 2)
    return total_params(cfg, vocab) - emb


def fsdp_shard_numel(shape: tuple[int, ...], dp: int) -> int:
    """Elements the largest FSDP2 shard of one parameter holds (dim-0 chunks, rounded up)."""
    if dp == 1:
        return numel(shape)
    return math.ceil(shape[0] / dp) * numel(shape[1:])


# -- activations -----------------------------------------------------------------------------

@dataclass
class Dims:
    """Per-rank sizes of one stage: hidden, local head/ffn widths and dtypes."""

    h: int  # hidden size (full: residual stream)
    hq: int  # query width on this TP rank
    hkv: int  # key (= value) width on this TP rank
    heads: int  # query heads on this TP rank
    ffn: int  # FFN width on this TP rank
    head_dim: int
    vocab: int  # vocabulary rows on this TP rank
    a: int  # bytes of a matmul output (2 under bf16 autocast, else 4)
    sp: int  # the sequence-parallel divisor of norm/residual tokens (tp under SP, else 1)


def dims(cfg: Config, vocab: int, tp: int) -> Dims:
    m = cfg.model
    return Dims(h=m.hidden_size, hq=m.num_attention_heads * m.head_dim // tp,
                hkv=m.kv_heads * m.head_dim // tp, heads=m.num_attention_heads // tp,
                ffn=m.ffn_hidden_size // tp, head_dim=m.head_dim, vocab=vocab // tp,
                a=2 if cfg.train.precision == "bf16" else 4,
                sp=tp if cfg.parallel.sequence_parallel else 1)


@dataclass
class Step:
    """One pass of the layer stack: ``n`` query tokens over a cache of ``keys`` tokens.

    ``width_q`` / ``width_k``: the longest batch row of queries / keys (SDPA pads rows to it);
    ``gathered``: the packed latent layout (else the dense causal layout of step 1).
    ``new_cache``: the keys are read in place from the latent loop's K/V store (steps >= 2),
    not copied for this step.
    """

    n: int
    keys: int
    width_q: int
    width_k: int
    gathered: bool
    new_cache: bool


def step_profile(cfg: Config, rows: int, fractions: list[float] | None = None) -> list[Step]:
    """The passes one micro-batch of ``rows`` sequences runs, with tokens active per step.

    ``fractions[k]``: the share of tokens running step k+1 (adaptive only; default all K_max,
    the worst case the memory must hold). Active tokens are taken evenly spread over rows.
    """
    lat, seq = cfg.latent, cfg.data.seq_length
    n = rows * seq
    k_max = 1 if lat.method == "vanilla" else lat.max_steps
    if lat.method == "pause":
        long = seq * k_max
        return [Step(rows * long, rows * long, long, long, False, False)]
    if lat.method in ("looped", "pondering"):
        return [Step(n, n, seq, seq, False, False) for _ in range(k_max)]
    if lat.method == "ponderlm2" and k_max > 1:  # fresh causal passes over p*T interleaved slots
        return [Step(n * p, n * p, seq * p, seq * p, False, False)
                for p in flops.ponderlm2_passes(k_max, lat.jacobi_iterations)]
    if lat.method == "mor":  # first layer, the recursions' packed selections, last layer
        counts = flops_counts(cfg, fractions).step_tokens[1:-1]
        inner = [Step(int(c) * rows, int(c) * rows, int(c), int(c), True, False) for c in counts]
        return [Step(n, n, seq, seq, False, False), *inner, Step(n, n, seq, seq, False, False)]
    if lat.method != "adaptive" or fractions is None:
        fractions = [1.0] * k_max
    if len(fractions) != k_max:
        raise ConfigError(f"--active-fractions: expected {k_max} values (latent.max_steps), "
                          f"got {len(fractions)}")
    steps, keys = [], 0
    for k, frac in enumerate(fractions):
        tokens = int(round(frac * n)) if k else n
        if k and tokens == 0:
            break
        keys += tokens
        width_q = min(seq, math.ceil(tokens / rows))
        steps.append(Step(tokens, keys, width_q, min(seq * (k + 1), math.ceil(keys / rows)),
                          gathered=k > 0, new_cache=k > 0))
    return steps


def _norm(n: float, dm: Dims) -> float:
    """RMSNorm + the following linear's saved input: x, x*rstd (fp32), rstd, and the output
    as the linear saves it (cast to bf16 under autocast, model.llama._AutocastCast)."""
    return ((2 * FP32 + dm.a) * dm.h + FP32) * n / dm.sp


def layer_step_bytes(step: Step, dm: Dims, backend: str, rows: int, doc_mask: bool) -> float:
    """Bytes one transformer block saves for backward in one pass (no recompute)."""
    n, a = step.n, dm.a
    gathered_sdpa = backend == "sdpa" and step.gathered
    total = 2 * _norm(n, dm)  # input and post-attention norms
    if not gathered_sdpa:  # (the gathered layout saves its gathered copies instead)
        total += a * (dm.hq + 2 * dm.hkv) * n  # fused QKV output (V is a view of it)
        total += a * (dm.hq + dm.hkv) * n  # rotated Q and K
    if backend == "flex":  # per-row copies of Q, K, V, output (whole blocks); log-sum-exp
        wq, wk = flex_widths(step)
        # token pass: V is a view; the latent loop's later steps read the K/V store in place
        kv = 0 if step.new_cache else 1 if not step.gathered and wq == step.width_q else 2
        total += rows * ((2 * a * dm.hq + FP32 * dm.heads) * wq + kv * a * dm.hkv * wk)
        total += a * dm.hq * n  # the output packed back (o_proj input)
        return total + 4 * a * dm.ffn * n  # gate|up output, silu(gate), silu(gate) * up
    total += FP32 * dm.heads * (rows * step.width_q if gathered_sdpa else n)  # log-sum-exp
    if step.gathered:  # SDPA over per-row gathered queries and cached keys, explicit mask
        wq, wk = rows * step.width_q, rows * step.width_k
        total += 2 * a * dm.hq * wq  # gathered queries, attention output
        if not step.new_cache:  # gathered keys and values (the latent loop reads its store)
            total += 2 * a * dm.hkv * wk
        total += a * rows * step.width_q * step.width_k  # the mask, as an additive float mask
        total += a * dm.hq * n  # the output packed back (o_proj input)
    else:
        total += a * dm.hq * n  # attention output (= o_proj input)
        if doc_mask:
            total += a * rows * step.width_q * step.width_k
    total += 4 * a * dm.ffn * n  # gate|up output, silu(gate), silu(gate) * up
    return total


def flex_widths(step: Step) -> tuple[int, int]:
    """flex's row widths of a pass: queries and keys rounded up to whole blocks."""
    from megatron_latentcot.model.attention import flex_width

    return flex_width(step.width_q), flex_width(step.width_k)


def flex_mask(step: Step, rows: int) -> int:
    """Bytes of the block mask (and row layout) flex builds for a pass, as built."""
    from megatron_latentcot.model.attention import flex_mask_bytes

    return flex_mask_bytes(rows, *flex_widths(step), keys=step.keys)


def step_shared_bytes(step: Step, dm: Dims, backend: str, rows: int) -> float:
    """Per pass, shared by all blocks of a stage: RoPE cos/sin, SDPA gather indices or
    flex's block mask with its row layout."""
    total = 2 * dm.head_dim * FP32 * step.n
    if backend == "flex":
        total += flex_mask(step, rows)
    elif step.gathered:
        total += (INDEX + 1) * rows * step.width_q + INDEX * rows * step.width_k
    return total


def kv_store_bytes(cfg: Config, dm: Dims, rows: int) -> float:
    """One layer's in-place K/V cache of a latent-loop micro-batch (``model.attention.KVStore``):
    keys and values for every (t, k) slot the steps can reach, allocated at step 1 whatever
    the router then decides (sequence parallelism's padding keys included); 0 for methods
    without one."""
    from megatron_latentcot.model.attention import latent_cache_columns

    lat = cfg.latent
    if lat.method not in ("latent_fixed", "adaptive") or lat.max_steps == 1:
        return 0.0
    columns = latent_cache_columns(lat.max_steps, cfg.data.seq_length, lat.attention_backend,
                                   dm.sp)
    return 2 * dm.a * dm.hkv * rows * columns


@dataclass
class ActivationEstimate:
    """Bytes of one micro-batch on one GPU."""

    layers: float  # saved by the transformer blocks, all steps (recompute: what they keep)
    latent_cache: float  # part of ``layers``: the K/V store (and gathered keys without one)
    attention_mask: float  # part of ``layers``: dense SDPA masks, or flex's block masks
    head: float  # embedding ids, final norms, router, LM head and loss
    loss_transient: float  # start of backward: log-softmax gradient and its input gradient
    recompute_transient: float  # recompute: one block rebuilt + its gradient buffers
    # ``layers`` split: per step (pipeline units), and the K/V store, alive with any of them
    per_step: list[float] = field(default_factory=list)
    kv_store: float = 0.0

    @property
    def saved(self) -> float:
        return self.layers + self.head


def activation_bytes(cfg: Config, vocab: int, tp: int, pp_rank: int, rows: int,
                     fractions: list[float] | None = None, recompute: bool | None = None,
                     doc_mask: bool | None = None) -> ActivationEstimate:
    """Activation memory of one micro-batch of ``rows`` sequences on one (stage, TP rank)."""
    lat, data = cfg.latent, cfg.data
    recompute = cfg.train.recompute if recompute is None else recompute
    pp = cfg.parallel.pipeline_model_parallel_size
    dm = dims(cfg, vocab, tp)
    backend = lat.attention_backend
    steps = step_profile(cfg, rows, fractions)
    n_layers = len(stage_layer_ids(cfg, pp_rank))
    doc_mask = data.reset_attention_mask if doc_mask is None else doc_mask
    per_layer = [layer_step_bytes(s, dm, backend, rows, doc_mask) for s in steps]
    # layers each step runs (MoR: 1, the shared block's per recursion, 1), as a share of n_layers
    depth = step_depths(cfg, len(steps), n_layers)
    share = [d / n_layers for d in depth]
    shared = sum(step_shared_bytes(s, dm, backend, rows) for s in steps)
    store = kv_store_bytes(cfg, dm, rows)  # per layer, from step 1 to the micro-batch's end
    cache = mask = flex_masks = 0.0
    for s, w in zip(steps, share, strict=True):
        if backend == "flex":  # one block mask per pass (in ``shared``)
            flex_masks += flex_mask(s, rows)
        elif s.gathered:
            cache += 0.0 if s.new_cache else w * 2 * dm.a * dm.hkv * rows * s.width_k
            mask += w * dm.a * rows * s.width_q * s.width_k
        elif doc_mask:
            mask += w * dm.a * rows * s.width_q * s.width_k
    rebuild = 0.0
    step_shared = [step_shared_bytes(s, dm, backend, rows) for s in steps]
    if recompute:  # each block keeps its input; the K/V store stays for the later steps
        per_step = [d * FP32 * dm.h * s.n / dm.sp + sh
                    for s, sh, d in zip(steps, step_shared, depth, strict=True)]
        layers = sum(d * FP32 * dm.h * s.n / dm.sp for s, d in zip(steps, depth)) \
            + n_layers * store + shared
        cache, mask = n_layers * store, flex_masks
        widest = max(s.n for s in steps)
        # one block's saved tensors rebuilt, plus the residual stream's gradients
        rebuild = max(per_layer) + 2 * FP32 * dm.h * widest / dm.sp
    else:
        per_step = [d * b + sh for b, sh, d in zip(per_layer, step_shared, depth, strict=True)]
        layers = sum(d * b for b, d in zip(per_layer, depth)) + shared + n_layers * store
        cache, mask = n_layers * (cache + store), n_layers * mask + flex_masks
    n = rows * data.seq_length
    head = loss = 0.0
    if pp_rank == 0:
        head += INDEX * n  # embedding ids
    if pp_rank == pp - 1:
        head += (INDEX + FP32) * n  # labels and loss mask
        vocab_local = dm.vocab
        if lat.method == "pause":
            head += _norm(steps[0].n, dm)
        elif lat.method == "ponderlm2" and len(steps) > 1:  # final norm of every pass
            head += sum(_norm(s.n, dm) for s in steps)
        elif lat.method == "mor":  # final norm; per recursion the router's input copy, logit,
            # gate and selection over its candidates, and the gated output added back
            head += _norm(n, dm)
            for s in steps[:-2]:
                head += (2 * FP32 * dm.h + 4 * FP32 + INDEX) * s.n
        elif lat.method in ("vanilla", "looped") or len(steps) == 1:
            head += _norm(n, dm)
        elif lat.method == "pondering":
            # final norm per pass; between passes the softmax (exp, probabilities) and the
            # expected-embedding matmul's input in the compute dtype
            head += len(steps) * _norm(n, dm)
            head += (len(steps) - 1) * (2 * FP32 + dm.a) * n * vocab_local
            if dm.a == 2:
                head += dm.a * vocab_local * dm.h  # autocast's bf16 copy of the embedding
        else:  # the latent loop: final norm per step, mixing, routing, z^f
            for i, s in enumerate(steps):
                head += _norm(s.n, dm)
                head += (FP32 * dm.h + FP32 + INDEX) * s.n / dm.sp  # p_exit * z into z^f
                if i < len(steps) - 1:
                    head += s.n / dm.sp  # which tokens continue
                    if lat.method == "adaptive":  # router input copy, logit, gate, reach
                        head += (FP32 * dm.h + 4 * FP32) * s.n / dm.sp
            head += FP32 * dm.h * n / dm.sp  # z^f (LM head input)
        head += FP32 * n * vocab_local  # log-softmax (or exp) of the logits, fp32
        loss = 2 * FP32 * n * vocab_local  # its gradient and the logits' gradient, fp32
    return ActivationEstimate(layers=layers, latent_cache=cache, attention_mask=mask, head=head,
                              loss_transient=loss, recompute_transient=rebuild, per_step=per_step,
                              kv_store=n_layers * store)


def pipeline_units(cfg: Config) -> int:
    """Units (steps) one micro-batch runs through a stage under PP: K for the latent loop and
    looped (``latent_pipeline.py``), 1 for one-pass models (``pipeline.py``)."""
    lat = cfg.latent
    if lat.method == "vanilla" or lat.max_steps == 1 or lat.method in ("pause", "pondering",
                                                                        "ponderlm2"):
        return 1
    return lat.max_steps


def step_depths(cfg: Config, steps: int, n_layers: int) -> list[int]:
    """Layers each of the ``steps`` passes runs: all ``n_layers`` (MoR: 1, the shared block per
    recursion, 1)."""
    if cfg.latent.method != "mor":
        return [n_layers] * steps
    return [1, *[n_layers - 2] * (steps - 2), 1]


def scheduled_activations(cfg: Config, act: ActivationEstimate, pp: int, micro: int,
                          pp_rank: int) -> tuple[float, int]:
    """(Peak activation bytes, micro-batches with a live unit) of stage ``pp_rank`` under
    ``parallel.pipeline_schedule``: each live (micro-batch, step) unit at its step's bytes (the
    head and loss with the last step: they live from its forward to the backward's start), and
    a K/V store per micro-batch with a live unit (its step-1 unit lives as long as it)."""
    from megatron_latentcot.training import schedules

    if pp == 1:
        return act.saved, 1
    k = pipeline_units(cfg)
    cost = list(act.per_step) if k > 1 else [act.layers]
    cost += [0.0] * (k - len(cost))  # (adaptive fractions can end the profile early)
    cost[-1] += act.head
    return schedules.peak_live(cfg.parallel.pipeline_schedule, pp, k, micro, pp_rank, cost,
                               act.kv_store)


# -- memory ----------------------------------------------------------------------------------

@dataclass
class StageMemory:
    """One GPU of one pipeline stage. ``terms`` in bytes; the peak is the larger of two phases:
    the start of backward (activations of the in-flight micro-batches, the loss gradient or, with
    recompute, a rebuilt block) and the optimizer step (weights, gradients, states)."""

    pp_rank: int
    layers: int
    params_local: int  # this TP rank's parameters (before FSDP sharding)
    params_shard: int  # after FSDP2 sharding over DP (the largest shard)
    terms: dict[str, float]
    activation: ActivationEstimate
    inflight_microbatches: float  # activations alive at the peak, in micro-batches' worth
    peak_backward: float
    peak_optimizer: float

    @property
    def peak(self) -> float:
        return max(self.peak_backward, self.peak_optimizer)


def stage_memory(cfg: Config, vocab: int, layout: Layout, pp_rank: int,
                 fractions: list[float] | None = None,
                 recompute: bool | None = None) -> StageMemory:
    """Memory of one GPU of stage ``pp_rank``."""
    tr = cfg.train
    shapes = stage_param_shapes(cfg, vocab, layout.tp, pp_rank)
    local = sum(numel(s) for s in shapes.values())
    sharded = cfg.parallel.zero == "fsdp2" and layout.dp > 1
    shard = sum(fsdp_shard_numel(s, layout.dp if sharded else 1) for s in shapes.values())
    num_micro = max(1, tr.global_batch_size // max(1, tr.micro_batch_size * layout.dp))
    act = activation_bytes(cfg, vocab, layout.tp, pp_rank, tr.micro_batch_size, fractions,
                           recompute)
    acts, live = scheduled_activations(cfg, act, layout.pp, num_micro, pp_rank)
    inflight = acts / act.saved if act.saved else 0.0
    head_params = sum(numel(s) for k, s in shapes.items()
                      if k.startswith(("norm.", "lm_head.", "router.")))
    weights, states, grads = FP32 * shard, 2 * FP32 * shard, FP32 * shard
    gathered = FP32 * local if sharded else 0.0
    # Gradients alive during backward: accumulated from earlier micro-batches (FSDP2 keeps them
    # unsharded while gradient sync is off), else only the head's, produced first.
    accumulated = FP32 * local if num_micro > 1 else FP32 * head_params
    working = max(act.loss_transient, act.recompute_transient + FP32 * head_params)
    terms = {
        "weights fp32 (ZeRO shard)": weights,
        "AdamW m, v fp32 (ZeRO shard)": states,
        "gradients fp32 (ZeRO shard; optimizer step)": grads,
        "weights fp32 gathered by FSDP2 (fwd + bwd)": gathered,
        "gradients fp32 alive during backward": accumulated,
        f"activations x {inflight:.3g} micro-batch(es) [{live} live]": acts,
        "backward working set": working,
    }
    peak_backward = weights + states + gathered + accumulated + acts + working
    peak_optimizer = weights + states + grads
    return StageMemory(pp_rank, len(stage_layer_ids(cfg, pp_rank)), local, shard, terms, act,
                       inflight, peak_backward, peak_optimizer)


# -- FLOPs and time ----------------------------------------------------------------------------

def flops_counts(cfg: Config, fractions: list[float] | None = None) -> flops.StepCounts:
    """flops.py's counts of one sequence of this config at the step profile: ``fractions[k]``
    the share of tokens running step k+1 (adaptive only; default all K_max, the worst case)."""
    lat = cfg.latent
    k = 1 if lat.method == "vanilla" else lat.max_steps
    dist = None
    if lat.method == "adaptive":
        if fractions is not None and len(fractions) != k:
            raise ConfigError(f"--active-fractions: expected {k} values (latent.max_steps), "
                              f"got {len(fractions)}")
        dist = flops.last_step_dist(fractions or [1.0] * k)
    if lat.method == "mor":  # expert: its capacities; token: depths from ``fractions`` (share
        # of tokens running recursion r; default all N_r, the worst case)
        expert = cfg.mor.router == "expert"
        if not expert and fractions is not None and len(fractions) != k:
            raise ConfigError(f"--active-fractions: expected {k} values (mor.num_recursion), "
                              f"got {len(fractions)}")
        return flops.method_counts(
            "mor", cfg.data.seq_length, k, None if expert else
            flops.last_step_dist(fractions or [1.0] * k),
            base_depth=mor_base_depth(cfg.model.num_layers, cfg.mor.num_recursion),
            capacity=mor_capacities(cfg.mor) if expert else None)
    return flops.method_counts(lat.method, cfg.data.seq_length, k, dist,
                               ptarget=lat.adaptive_loss_weight > 0, jacobi=lat.jacobi_iterations)


def train_flops_per_token(cfg: Config, vocab: int, fractions: list[float] | None = None,
                          rows: int = 1) -> float:
    """Exact training FLOPs per token (flops.py), at the step profile (default: worst case).

    Every count is linear in the batch rows, so the value is the same for any ``rows``
    (accepted so callers can pass their micro-batch size)."""
    return flops.train_flops_per_token(cfg.model, vocab, flops_counts(cfg, fractions),
                                       cfg.data.seq_length)


def passes_per_token(cfg: Config, fractions: list[float] | None = None) -> float:
    """(token, pass) slots per token: the paper's 6 N convention counts these."""
    counts = flops_counts(cfg, fractions)
    if counts.step_layers is not None:  # MoR: runs through part of its physical layers
        layer_slots = sum(t * d for t, d in zip(counts.step_tokens, counts.step_layers))
        return layer_slots / (cfg.data.seq_length * len(stage_layer_ids(cfg, 0)))
    return sum(counts.step_tokens) / cfg.data.seq_length


@dataclass
class Plan:
    config: str | None
    layout: Layout
    vocab: int
    gpu: str
    gpu_memory_gb: float
    reserve_gb: float
    mfu: float
    total_params: int
    non_embedding_params: int
    stages: list[StageMemory]
    stages_recompute_flip: list[StageMemory]
    flops_per_token: float
    kaplan_flops_per_token: float
    passes_per_token: float
    tokens_per_iter: int
    time_per_iter_s: float | None
    train_days: float | None
    micro_batches: int
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fits"] = self.fits
        d["peak_gib"] = [s.peak / GiB for s in self.stages]
        return d


def make_plan(cfg: Config, layout: Layout, vocab: int, gpu: str = "H100",
              gpu_memory_gb: float = 80.0, mfu: float = 0.4, peak_tflops: float | None = None,
              fractions: list[float] | None = None, config_name: str | None = None,
              reserve_gb: float = 4.0) -> Plan:
    tr = cfg.train
    stages = [stage_memory(cfg, vocab, layout, s, fractions) for s in range(layout.pp)]
    flipped = [stage_memory(cfg, vocab, layout, s, fractions, recompute=not tr.recompute)
               for s in range(layout.pp)]
    fpt = train_flops_per_token(cfg, vocab, fractions)
    passes = passes_per_token(cfg, fractions)
    tokens = tr.global_batch_size * cfg.data.seq_length
    peak = flops.peak_tflops(gpu, peak_tflops)
    t_iter = fpt * tokens / (layout.world * peak * 1e12 * mfu) if peak else None
    days = t_iter * tr.train_iters / 86400 if t_iter is not None else None
    problems = []
    budget = (gpu_memory_gb - reserve_gb) * GiB
    for s in stages:
        if s.peak > budget:
            problems.append(f"stage {s.pp_rank}: estimated peak {s.peak / GiB:.1f} GiB exceeds "
                            f"{gpu_memory_gb:g} GiB per GPU less {reserve_gb:g} GiB reserved")
    problems += layout_problems(cfg, layout)
    dp_batch = tr.micro_batch_size * layout.dp
    return Plan(config=config_name, layout=layout, vocab=vocab, gpu=gpu,
                gpu_memory_gb=gpu_memory_gb, reserve_gb=reserve_gb, mfu=mfu,
                total_params=total_params(cfg, vocab),
                non_embedding_params=non_embedding_params(cfg, vocab), stages=stages,
                stages_recompute_flip=flipped, flops_per_token=fpt,
                kaplan_flops_per_token=flops.kaplan_flops_per_token(total_params(cfg, vocab), passes),
                passes_per_token=passes, tokens_per_iter=tokens, time_per_iter_s=t_iter,
                train_days=days, micro_batches=max(1, tr.global_batch_size // dp_batch),
                problems=problems)


def layout_problems(cfg: Config, layout: Layout) -> list[str]:
    """Layouts the code refuses or that cannot work, whatever the memory."""
    tr, par, m = cfg.train, cfg.parallel, cfg.model
    refusal = layout_refusal(cfg)  # config.py's table (load_config already refuses these)
    out = [refusal] if refusal else []
    if m.tie_embeddings and layout.pp > 1:
        out.append("model.tie_embeddings with PP > 1: the last stage has no embedding to tie")
    if m.tie_embeddings and par.zero == "fsdp2" and layout.dp > 1:
        out.append("model.tie_embeddings with parallel.zero=fsdp2 and DP > 1 is refused (Optimizer)")
    dp_batch = tr.micro_batch_size * layout.dp
    if tr.global_batch_size % dp_batch:
        out.append(f"train.global_batch_size ({tr.global_batch_size}) is not a multiple of "
                   f"micro_batch_size x DP ({dp_batch})")
    if layout.gpus_per_node and layout.tp > layout.gpus_per_node:
        out.append(f"TP {layout.tp} spans nodes ({layout.gpus_per_node} GPUs per node)")
    return out


# -- report ------------------------------------------------------------------------------------

def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def report(plan: Plan, cfg: Config) -> str:
    """The human-readable report."""
    lay, tr, lat = plan.layout, cfg.train, cfg.latent
    m = cfg.model
    k_max = 1 if lat.method == "vanilla" else lat.max_steps
    nodes = f" = {lay.nodes} node(s) x {lay.gpus_per_node} GPUs" if lay.gpus_per_node else ""
    lines = [
        f"== plan: {plan.config or 'config'}",
        f"model      {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads "
        f"({m.kv_heads} KV), FFN {m.ffn_hidden_size}, vocab {plan.vocab}, seq {cfg.data.seq_length}"
        f", {'tied' if m.tie_embeddings else 'untied'} embeddings",
        f"method     {lat.method} (K_max {k_max}, attention {lat.attention_backend}), precision "
        f"{tr.precision}, recompute {'on' if tr.recompute else 'off'}",
        f"layout     TP {lay.tp} x PP {lay.pp} x DP {lay.dp} = {lay.world} GPUs{nodes}; sequence "
        f"parallel {'on' if cfg.parallel.sequence_parallel else 'off'}; ZeRO "
        f"{cfg.parallel.zero if lay.dp > 1 else 'n/a (DP 1)'}",
        f"batch      micro {tr.micro_batch_size} x {plan.micro_batches} micro-batches x DP {lay.dp}"
        f" = global {tr.global_batch_size} sequences = {plan.tokens_per_iter:,} tokens/iteration",
        f"params     total {_fmt_count(plan.total_params)} ({plan.total_params:,}); "
        f"non-embedding {_fmt_count(plan.non_embedding_params)}",
    ]
    for s in plan.stages:
        lines.append(f"  stage {s.pp_rank}: {s.layers} layers, {s.params_local:,} per TP rank, "
                     f"{s.params_shard:,} per GPU after ZeRO")
    sched = cfg.parallel.pipeline_schedule
    alive = "K x PP - stage of them" if sched == "1f1b" else "all of every micro-batch"
    lines.append(f"memory per GPU (GiB; worst case: every token runs all {k_max} step(s)"
                 + (f"; pipeline schedule {sched}: (micro-batch, step) units alive at a stage's "
                    f"peak, {alive}" if lay.pp > 1 else "") + ")")
    for s, f in zip(plan.stages, plan.stages_recompute_flip):
        lines.append(f"  stage {s.pp_rank}:")
        for name, value in s.terms.items():
            if value:
                lines.append(f"    {name:44s} {value / GiB:9.2f}")
        a = s.activation
        lines.append(f"      of which per micro-batch: blocks {a.layers / GiB:.2f} (latent K/V "
                     f"{a.latent_cache / GiB:.2f}, {lat.attention_backend} masks "
                     f"{a.attention_mask / 2**20:.1f} MiB), head/loss {a.head / GiB:.2f}")
        other = "on" if not tr.recompute else "off"
        lines.append(f"    {'PEAK':44s} {s.peak / GiB:9.2f}   (backward {s.peak_backward / GiB:.2f}, "
                     f"optimizer step {s.peak_optimizer / GiB:.2f}; with recompute {other}: "
                     f"{f.peak / GiB:.2f})")
    lines.append(f"FLOPs/token  {plan.flops_per_token:.4g} exact (flops.py, {plan.passes_per_token:.2f}"
                 f" passes/token); 6N x passes = {plan.kaplan_flops_per_token:.4g}")
    if plan.time_per_iter_s is not None:
        tok_s = plan.tokens_per_iter / plan.time_per_iter_s
        lines.append(f"time         {plan.time_per_iter_s:.2f} s/iteration at MFU {plan.mfu:g} on "
                     f"{lay.world} x {plan.gpu} ({tok_s:,.0f} tokens/s); {tr.train_iters:,} "
                     f"iterations = {plan.train_days:.2f} days, "
                     f"{plan.flops_per_token * plan.tokens_per_iter * tr.train_iters:.3g} FLOPs")
    else:
        lines.append(f"time         unknown peak TFLOP/s for {plan.gpu!r} (pass --peak-tflops)")
    if plan.problems:
        lines.append("DOES NOT FIT / WILL NOT RUN:")
        lines += [f"  - {p}" for p in plan.problems]
    else:
        lines.append(f"OK: fits in {plan.gpu_memory_gb:g} GiB per GPU ({plan.reserve_gb:g} GiB "
                     "reserved for the CUDA context, NCCL buffers and fragmentation)")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------

def resolve_vocab(cfg: Config, tp: int, override: int | None) -> int:
    """``--vocab-size``, else model.vocab_size, else the tokenizer's vocab padded like training
    (:func:`megatron_latentcot.vocab.resolve_vocab`, the one resolver)."""
    from megatron_latentcot.vocab import resolve_vocab as resolve

    return resolve(cfg, tp, override)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (examples/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="overrides like parallel.tensor_model_parallel_size=8")
    p.add_argument("--world-size", type=int, help="GPUs in all (default TP x PP)")
    p.add_argument("--nodes", type=int, help="nodes (with --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node")
    p.add_argument("--gpu", default="H100", help=f"device for peak TFLOP/s: {', '.join(flops.PEAK_TFLOPS)}")
    p.add_argument("--peak-tflops", type=float, help="override the device's dense bf16 peak")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU (GiB)")
    p.add_argument("--reserve-gb", type=float, default=4.0,
                   help="GiB per GPU kept for the CUDA context, NCCL buffers, fragmentation")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time")
    p.add_argument("--vocab-size", type=int, help="embedding rows when model.vocab_size is null")
    p.add_argument("--active-fractions", help="adaptive: share of tokens running each step, "
                   "e.g. 1,0.9,0.8,0.7 (default: all, the worst case)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the report")
    p.add_argument("--check", action="store_true", help="exit 3 when the layout cannot fit or run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        layout = make_layout(cfg, args.world_size, args.nodes, args.gpus_per_node)
        vocab = resolve_vocab(cfg, layout.tp, args.vocab_size)
        fractions = ([float(x) for x in args.active_fractions.split(",")]
                     if args.active_fractions else None)
        plan = make_plan(cfg, layout, vocab, args.gpu, args.gpu_memory_gb, args.mfu,
                         args.peak_tflops, fractions, args.config, args.reserve_gb)
    except (ConfigError, ValueError) as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1, default=str) if args.json else report(plan, cfg))
    return 3 if args.check and not plan.fits else 0


if __name__ == "__main__":
    sys.exit(main())
