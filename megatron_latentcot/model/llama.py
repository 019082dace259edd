"""Llama decoder on megatron-core tensor-parallel layers, one pipeline stage at a time.

Activations are packed ``[N, 1, H]`` (megatron's ``[s, b, h]`` with the packed token slots as
the sequence), so sequence parallelism shards the token slots and the latent scheduler can feed
any subset of tokens through the same layers.

Q/K/V and gate/up are fused column-parallel GEMMs (one all-gather each under sequence
parallelism). Each fused weight holds, on every TP rank, that rank's slice of each logical
HF-style weight (``q_proj``, ``k_proj``, ...); :func:`logical_parameters` exposes those
logical pieces, so initialisation, export and tests are independent of the parallel layout.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_latentcot.config import Config, ModelConfig
from megatron_latentcot.model.attention import AttentionPlan, KVStore, attention, cache_keys
from megatron_latentcot.model.router import Router
from megatron_latentcot.parallel import ParallelContext

if TYPE_CHECKING:
    from megatron_latentcot.model.latent import KVStream


# One layer's cache in a run: its store and the views of the keys/values cached before the run
# (None: nothing yet). Passed explicitly, so a recomputed block (activation checkpointing) sees
# the same views as its first forward.
LayerCache = tuple[KVStore, "tuple[torch.Tensor, torch.Tensor] | None"]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision -> float32 for numerically sensitive ops; float32/64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, sequence_parallel: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))
        # Under sequence parallelism each TP rank sees a different token shard, so the
        # weight's gradient is partial and must be all-reduced over TP (see optimizer.py).
        self.weight.sequence_parallel = sequence_parallel

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        return F.rms_norm(xf, (x.shape[-1],), self.weight.to(xf.dtype), self.eps).type_as(x)


class RotaryEmbedding(nn.Module):
    """HF-style RoPE (rotate-half). Every latent step of token t uses position t.

    ``scaling`` (``model.rope_scaling`` and its ``rope_*`` fields, see :meth:`from_config`)
    rescales the frequencies exactly as transformers does, so an imported Llama-3.1 checkpoint
    sees the positions it was trained with.
    """

    def __init__(self, head_dim: int, theta: float,
                 scaling: tuple[str, dict[str, float]] | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    @classmethod
    def from_config(cls, m: ModelConfig) -> RotaryEmbedding:
        from megatron_latentcot.config import ROPE_SCALING_FIELDS

        scaling = None if m.rope_scaling is None else (
            m.rope_scaling, {f: getattr(m, f) for f in ROPE_SCALING_FIELDS[m.rope_scaling]})
        return cls(m.head_dim, m.rope_theta, scaling)

    def _inv_freq(self) -> torch.Tensor:
        inv = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64)
                             / self.head_dim)
        if self.scaling is None:
            return inv
        kind, p = self.scaling
        factor = p["rope_scaling_factor"]
        if kind == "linear":
            return inv / factor
        # "llama3": wavelengths above original/low_freq are divided by factor, those below
        # original/high_freq kept, the ones between interpolated (transformers' formula).
        low, high = p["rope_low_freq_factor"], p["rope_high_freq_factor"]
        original = p["rope_original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > original / low, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, smoothed, scaled)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) frequencies after a meta-device build."""
        with torch.no_grad():
            self.inv_freq.copy_(self._inv_freq().to(self.inv_freq.device))

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.double()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat([angles, angles], dim=-1)[:, None, :]  # [N, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (upcast(x) * cos + upcast(rotated) * sin).type_as(x)


class Embedding(VocabParallelEmbedding):
    """Vocab-parallel embedding that can also embed a distribution over the vocabulary.

    ``forward(probs, soft=True)`` returns ``probs @ E`` (pondering's expected embedding); going
    through ``forward`` keeps FSDP2's gather of the weight on the same path as token lookups.
    """

    def forward(self, input_: torch.Tensor, soft: bool = False) -> torch.Tensor:
        if not soft:
            return super().forward(input_)
        from megatron.core.tensor_parallel import (
            reduce_from_tensor_model_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        # [N, 1, V/tp] @ [V/tp, H]; under autocast a bf16 GEMM whose result returns to the
        # probabilities' precision, like a token lookup of fp32 weights (the residual stream)
        partial = (input_ @ self.weight.to(input_.dtype)).to(input_.dtype)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``device``; None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class _AutocastCast:
    """Lets megatron-core's TP linear run under autocast off CUDA.

    Why: megatron's autograd functions are ``custom_fwd/custom_bwd(device_type="cuda")``. On
    CUDA the backward re-enters autocast and megatron saves the fp32 parameter (autocast's
    cast cache makes the bf16 copy transient): that path is left alone. On any other device
    (the CPU tests) the backward would see a bf16 gradient against an fp32 weight and fail, so
    the input and weight are cast before the function, as autocast would for that matmul
    (bf16 operands, the fp32 master weight getting an fp32 gradient through the cast). The
    price, CPU only: each call keeps its own bf16 weight copy until the backward. Outside
    autocast, or with weights already bf16 (FSDP2's mixed-precision gather), nothing is cast.
    """

    # megatron passes ``input=``, ``weight=``, ``bias=`` by keyword: the names must match.
    def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor, *args: object,
                      **kwargs: object) -> torch.Tensor:
        dtype = autocast_dtype(input.device)
        if dtype is not None:
            input = input.to(dtype)  # saved for backward and all-gathered (SP) in bf16
            if input.device.type != "cuda":
                weight = weight.to(dtype)
                if kwargs.get("bias") is not None:
                    kwargs["bias"] = kwargs["bias"].to(dtype)
        return super()._forward_impl(input, weight, *args, **kwargs)


class CastColumnParallelLinear(_AutocastCast, ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear that runs under autocast on every device."""


class CastRowParallelLinear(_AutocastCast, RowParallelLinear):
    """megatron-core's RowParallelLinear that runs under autocast on every device."""


class FusedColumnParallelLinear(CastColumnParallelLinear):
    """Column-parallel GEMM over several logical weights; each rank holds its slice of each."""

    def __init__(self, hidden: int, parts: dict[str, int], config: ModelParallelConfig):
        super().__init__(hidden, sum(parts.values()), config=config, init_method=_no_init,
                         bias=False, gather_output=False)
        self.parts = parts


def _no_init(_: torch.Tensor) -> None:  # weights are initialised by init_weights()
    pass


@dataclass
class LogicalParameter:
    """A view of one HF-style weight inside this rank's (possibly fused) parameter."""

    param: nn.Parameter
    local: torch.Tensor  # this rank's slice (a view into ``param``)
    shape: tuple[int, ...]  # the full logical shape
    partition_dim: int | None  # TP-sharded along this dim, None if replicated
    # Where ``local`` sits inside ``param`` (a part of a fused weight).
    rows: slice = field(default_factory=lambda: slice(None))

    def grad(self) -> torch.Tensor | None:
        """This rank's slice of the logical weight's gradient."""
        g = self.param.grad
        return None if g is None else g[self.rows]


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_size: int):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_heads = cfg.num_attention_heads // tp_size
        self.kv_heads = cfg.kv_heads // tp_size
        d = self.head_dim
        self.qkv_proj = FusedColumnParallelLinear(
            cfg.hidden_size,
            {"q_proj": cfg.num_attention_heads * d, "k_proj": cfg.kv_heads * d,
             "v_proj": cfg.kv_heads * d}, mp)
        self.o_proj = CastRowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size,
                                            config=mp, init_method=_no_init, bias=False,
                                            input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                plan: AttentionPlan, cache: LayerCache | None):
        """``cache``: attend to the keys cached so far and add this call's (in place);
        the returned keys/values are then the cache's views, else this call's packed ones."""
        qkv, _ = self.qkv_proj(x)
        n, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.view(n, -1, d).split([self.q_heads, self.kv_heads, self.kv_heads], dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k_all, v_all = cache_keys(*cache, k, v, plan)
            if not plan.dense:  # a dense plan's keys are this call's: read them packed
                k, v = k_all, v_all
        out = attention(q, k, v, plan)
        out, _ = self.o_proj(out.unsqueeze(1))
        return (out, k, v) if cache is None else (out, k_all, v_all)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        f = cfg.ffn_hidden_size
        self.gate_up_proj = FusedColumnParallelLinear(cfg.hidden_size,
                                                      {"gate_proj": f, "up_proj": f}, mp)
        self.down_proj = CastRowParallelLinear(f, cfg.hidden_size, config=mp,
                                               init_method=_no_init, bias=False,
                                               input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down_proj(F.silu(gate) * up)
        return out


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_size: int):
        super().__init__()
        sp = mp.sequence_parallel
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, sp)
        self.self_attn = SelfAttention(cfg, mp, tp_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, sp)
        self.mlp = MLP(cfg, mp)

    def forward(self, x, rope, plan, cache=None):
        """Returns the block output and the keys/values (see :meth:`SelfAttention.forward`)."""
        attn_out, k, v = self.self_attn(self.input_layernorm(x), rope, plan, cache)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


def stage_layers(num_layers: int, pp_size: int, explicit: list[int] | None) -> list[list[int]]:
    """Global layer indices of every pipeline stage."""
    counts = explicit or [num_layers // pp_size] * pp_size
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class LayerRun:
    """One request to run a stage's layers (a step of a method; see ``LatentStepScheduler.steps``).

    ``x`` None means the token pass input: the token embedding on the first stage, else what the
    previous stage sent. ``slots``: the packed token slots the rows stand for (they tell the
    other pipeline stages which tokens run); ``cache``: the K/V stream the run attends to and
    extends (the latent loop's steps in training, every run of a decoder); ``past``: the
    stream already holds earlier runs of this micro-batch (a pipeline carries them over).
    """

    x: torch.Tensor | None
    slots: torch.Tensor
    positions: torch.Tensor
    plan: AttentionPlan
    past: bool = False
    cache: KVStream | None = None
    layers: tuple[int, ...] | None = None  # physical layers to run, in order (None: all; MoR)


class LlamaStage(nn.Module):
    """The layers of one pipeline stage (the whole model when PP = 1).

    The first stage owns the embedding, the last the final norm, LM head and router; layers
    keep their global index as name so checkpoints do not depend on the pipeline split.
    """

    def __init__(self, cfg: Config, ctx: ParallelContext, vocab_size: int):
        super().__init__()
        m = cfg.model
        self.cfg = m
        self.vocab_size = vocab_size
        self.tp_size = ctx.tp_size
        self.sequence_parallel = ctx.sequence_parallel
        self.recompute = cfg.train.recompute
        self.attention_backend = cfg.latent.attention_backend
        self.pre_process, self.post_process = ctx.is_first_stage, ctx.is_last_stage
        mp = ModelParallelConfig(
            tensor_model_parallel_size=ctx.tp_size, sequence_parallel=ctx.sequence_parallel,
            params_dtype=torch.float32, use_cpu_initialization=True, perform_initialization=False,
            gradient_accumulation_fusion=False,
        )
        self.embedding_multiplier = (m.embedding_multiplier if m.embedding_multiplier is not None
                                     else math.sqrt(2.5 * m.hidden_size))
        # pondering's expected embedding probs @ (E * scale) (latent.pondering_embedding_scale)
        self.soft_embedding_scale = (math.sqrt(m.hidden_size)
                                     if cfg.latent.pondering_embedding_scale == "sqrt_hidden"
                                     else self.embedding_multiplier)
        # Shapes only: every parameter is allocated once, on ctx.device, by materialise(), and
        # init_weights() then draws just this rank's TP shard (with TP = 1 that is the whole
        # stage, which FSDP2 then shards over data parallelism).
        with torch.device("meta"):
            if self.pre_process:
                self.embed_tokens = Embedding(
                    vocab_size, m.hidden_size, init_method=_no_init, config=mp,
                    reduce_scatter_embeddings=ctx.sequence_parallel)
                if cfg.latent.method == "pause":  # one learnable embedding per pause slot
                    self.pause_embeddings = nn.Embedding(cfg.latent.max_steps - 1, m.hidden_size)
            ids = stage_layers(m.num_layers, ctx.pp_size, cfg.parallel.pipeline_layers)[ctx.pp_rank]
            if cfg.latent.method == "mor":  # physical: first, the shared block, last (PP = 1)
                from megatron_latentcot.model.mor import build_routers, physical_layers

                ids = list(range(physical_layers(cfg)))
                self.mor_router = build_routers(cfg)  # replicated across TP
            self.layers = nn.ModuleDict({str(i): TransformerBlock(m, mp, ctx.tp_size) for i in ids})
            self.rotary = RotaryEmbedding.from_config(m)
            if self.post_process:
                self.norm = RMSNorm(m.hidden_size, m.norm_eps, ctx.sequence_parallel)
                if not m.tie_embeddings:
                    self.lm_head = CastColumnParallelLinear(
                        m.hidden_size, vocab_size, config=mp, init_method=_no_init, bias=False,
                        gather_output=False)
                if cfg.latent.method == "adaptive":
                    self.router = Router(m.hidden_size, cfg.latent.router_bias_init,
                                         ctx.sequence_parallel)
        materialise(self, ctx.device)
        _mark_tensor_parallel(self)

    # -- pieces the schedulers compose -------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Packed token ids [N] -> [N(/tp under SP), 1, H]."""
        ids = tokens.view(1, -1) if self.sequence_parallel else tokens.view(-1, 1)
        return self.embed_tokens(ids) * self.embedding_multiplier

    def embed_distribution(self, probs: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel probabilities [N, 1, V/tp] -> expected embedding [N(/tp), 1, H],
        ``probs @ (E * soft_embedding_scale)`` (pondering's)."""
        return self.embed_tokens(probs, soft=True) * self.soft_embedding_scale

    def pause_vectors(self, dtype: torch.dtype) -> torch.Tensor:
        """The K-1 learnable pause embeddings [K-1, H], through the module's forward: FSDP2
        gathers a unit's parameters only when it is called, not when its weight is read."""
        slots = self.pause_embeddings.num_embeddings
        ids = torch.arange(slots, device=self.pause_embeddings.weight.device)
        return self.pause_embeddings(ids).to(dtype)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan,
                   past: list | None = None,
                   layers: tuple[int, ...] | None = None) -> tuple[torch.Tensor, list]:
        """Run this stage's blocks (``layers``: only these physical ones, in this order; MoR's
        recursions reuse its shared block). ``past``: one :data:`LayerCache` per layer run
        (the run attends to and extends it), or None (no cache).

        Returns the output and, with ``past``, the updated caches (else this call's packed
        per-layer (keys, values)).
        """
        rope = self.rotary(positions, upcast(x).dtype)
        new_kv = []
        blocks = self.layers.values() if layers is None else [self.layers[str(i)] for i in layers]
        for i, block in enumerate(blocks):
            layer_past = None if past is None else past[i]
            if self.recompute and torch.is_grad_enabled():
                x, k, v = checkpoint(block, x, rope, plan, layer_past, use_reentrant=False)
            else:
                x, k, v = block(x, rope, plan, layer_past)
            new_kv.append((k, v) if layer_past is None else (layer_past[0], (k, v)))
        return x, new_kv

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """[N(/tp), 1, H] -> vocab-parallel logits [N, 1, V/tp] (gathers tokens under SP)."""
        if self.cfg.tie_embeddings:
            from megatron.core.tensor_parallel import (
                copy_to_tensor_model_parallel_region,
                gather_from_sequence_parallel_region,
            )

            z = (gather_from_sequence_parallel_region(z) if self.sequence_parallel
                 else copy_to_tensor_model_parallel_region(z))
            return self._mask_padding(F.linear(z, self.embed_tokens.weight))
        out, _ = self.lm_head(z)
        return self._mask_padding(out)

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf at rows >= ``model.predicted_vocab_size`` (an imported vocabulary's padding):
        never predicted, so losses and samples are the source model's."""
        keep = self.cfg.predicted_vocab_size
        if keep is None or keep >= self.vocab_size:
            return logits
        from megatron.core import parallel_state

        part = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * part
        cols = torch.arange(start, start + part, device=logits.device)
        return logits.masked_fill(cols >= keep, float("-inf"))


# -- layout-independent views, initialisation -----------------------------------------------

def _mark_tensor_parallel(model: nn.Module) -> None:
    """Tag TP-sharded weights (megatron only does it when it initialises them itself)."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(module.weight, True, 0, 1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(module.weight, True, 1, 1)


def logical_parameters(model: nn.Module) -> Iterator[tuple[str, LogicalParameter]]:
    """Yield (HF-style name, view) for every logical weight held by this rank."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, FusedColumnParallelLinear):
            base = prefix.rsplit(".", 2)[0] + "."  # drop "qkv_proj." / "gate_up_proj."
            tp = _tp_size_of(module)
            offset = 0
            for part, rows in module.parts.items():
                local_rows = rows // tp
                sl = slice(offset, offset + local_rows)
                yield f"{base}{part}.weight", LogicalParameter(
                    module.weight, module.weight[sl], (rows, module.input_size), 0, sl)
                offset += local_rows
        else:
            for pname, p in module.named_parameters(recurse=False):
                full = list(p.shape)
                dim = getattr(p, "partition_dim", None) if getattr(
                    p, "tensor_model_parallel", False) else None
                if dim is not None:
                    full[dim] *= _tp_size_of(module)
                yield f"{prefix}{pname}", LogicalParameter(p, p, tuple(full), dim, slice(None))


def _tp_size_of(module: nn.Module) -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _init_std(name: str, cfg: ModelConfig) -> float | None:
    """None = ones (norm weights)."""
    if name.endswith("norm.weight"):
        return None
    std = cfg.init_std if cfg.init_std is not None else math.sqrt(2.0 / (5.0 * cfg.hidden_size))
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2.0 * cfg.num_layers)
    return std


def materialise(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-built model's parameters on ``device``; reset the small modules.

    The tensor-parallel weights stay uninitialised (``init_weights`` draws them, shard by
    shard); norms, router and rotary frequencies get their constructor values. Attributes set
    on the parameters (megatron's ``tensor_model_parallel``, our ``sequence_parallel``) survive.
    """
    attrs = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        for key, value in attrs[name].items():
            setattr(p, key, value)
    parallel = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
    for module in model.modules():
        if module is not model and not isinstance(module, parallel) \
                and hasattr(module, "reset_parameters"):
            module.reset_parameters()


# Values are drawn in blocks of this many indices along a weight's partition dimension, each
# block from its own generator: a rank draws the blocks its shard overlaps and nothing else,
# and the values do not depend on the layout. Changing it changes every initial weight.
INIT_BLOCK = 256


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def trunc_normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std^2) truncated to +-2 std: the out-of-range draws are drawn again until in range,
    which is exactly the truncated distribution and ~6x faster on CPU than the inverse-CDF
    sampler of ``nn.init.trunc_normal_`` (25M vs 4M values/s on one core)."""
    x = torch.randn(shape, generator=gen)
    flat = x.view(-1)
    bad = (flat.abs() > 2).nonzero().squeeze(1)
    while bad.numel():
        flat[bad] = torch.randn(bad.numel(), generator=gen)
        bad = bad[flat[bad].abs() > 2]
    return x.mul_(std)


def init_slice_(out: torch.Tensor, name: str, shape: tuple[int, ...], dim: int, start: int,
                std: float, seed: int) -> int:
    """Fill ``out`` with indices ``[start, start + out.shape[dim])`` along ``dim`` of logical
    weight ``name`` (full shape ``shape``). Returns how many values were drawn: the slice plus
    at most two partial blocks."""
    end, drawn = start + out.shape[dim], 0
    for block in range(start // INIT_BLOCK, -(-end // INIT_BLOCK)):
        lo, hi = block * INIT_BLOCK, min((block + 1) * INIT_BLOCK, shape[dim])
        block_shape = list(shape)
        block_shape[dim] = hi - lo
        gen = torch.Generator(device="cpu").manual_seed(_block_seed(seed, name, block))
        values = trunc_normal(tuple(block_shape), std, gen)
        drawn += values.numel()
        a, b = max(lo, start), min(hi, end)
        out.narrow(dim, a - start, b - a).copy_(values.narrow(dim, a - lo, b - a))
    return drawn


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Draw this rank's slice of every logical weight (``init_slice_``), never the full weight.

    The same seed gives the same full model for any TP/PP layout, which is what makes
    parallel runs comparable with a single process. Norm weights are ones; the router bias
    keeps its configured start (``latent.router_bias_init``).
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, lp in logical_parameters(model):
        if name.endswith("router.bias"):
            continue
        std = _init_std(name, cfg)
        if std is None:
            lp.local.fill_(1.0)
            continue
        dim = lp.partition_dim if lp.partition_dim is not None else 0
        start = tp_rank * lp.local.shape[dim] if lp.partition_dim is not None else 0
        init_slice_(lp.local, name, lp.shape, dim, start, std, seed)
