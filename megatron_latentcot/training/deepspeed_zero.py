"""DeepSpeed ZeRO-1/2 as the data-parallel sharding (``parallel.zero: deepspeed``), where exact.

Tensor parallelism stays megatron-core's; DeepSpeed only owns the data-parallel side: it
partitions AdamW's states (stage 1) and gradients (stage 2) over our data-parallel group (an
``mpu`` adapter hands it our already-initialised groups), reduces gradients, computes the global
norm (TP-replicated parameters counted on TP rank 0 only, via ``tensor_model_parallel``), clips
and applies the update.

Where it is exact (measured, DESIGN.md and tests/test_deepspeed.py): pipeline size 1, where the
K latent steps reuse every layer inside one forward and each micro-batch has one backward.
DeepSpeed runs in its *unmanaged* gradient-accumulation mode: every ``backward`` only
accumulates, ``engine.step()`` is the accumulation boundary, so data-parallel ranks whose tokens
halt after different step counts still issue the same collectives. Refused up front
(:func:`check_config`): pipeline parallelism (silent-wrong modes under our hand-written
pipeline), sequence parallelism (its TP-partial gradients would need a TP all-reduce before
DeepSpeed's reduction, which this integration does not do), ZeRO-3 (measured wrong:
``ZERO3_REASON``), ZeRO-1 ``overlap_comm`` (measured wrong, DESIGN.md; DeepSpeed's unmanaged
mode also refuses it), offload (not tested), and
DeepSpeed fp16/bf16 (``train.precision`` owns precision: bf16 runs under our autocast over fp32
master weights, as without DeepSpeed).

Checkpoints: the DeepSpeed optimizer's own state dict (fp32 partitions and AdamW states of this
rank's partition) goes in the rank file; resume needs the same layout and ZeRO stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_latentcot.config import Config, ConfigError, ParallelConfig

if TYPE_CHECKING:  # config validation (check_config) imports this module: no torch at import
    from torch import nn

    from megatron_latentcot.parallel import ParallelContext

# zero_optimization keys a ds_config.json may set; the rest of that section is refused.
ZERO_KEYS = ("stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size",
             "allgather_bucket_size", "reduce_scatter", "allgather_partitions")
# Top-level keys we derive from train.* ourselves; a file may repeat them only with our value.
DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps", "gradient_clipping")
IGNORED_KEYS = ("steps_per_print", "wall_clock_breakdown")
ZERO3_REASON = ("ZeRO-3 is not exact here (measured at DP2 against one process: the first "
                "step's gradient norm comes out 0.67x (vanilla) and 0.71x (adaptive, K 3) of "
                "the true one and the losses diverge from step 2); use stage 1 or 2, or "
                "parallel.zero=fsdp2 which shards weights too")


def read_ds_config(par: ParallelConfig) -> dict[str, Any]:
    """The ``parallel.deepspeed_config`` file as a dict ({} when unset); one-line errors."""
    if not par.deepspeed_config:
        return {}
    path = Path(par.deepspeed_config)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"parallel.deepspeed_config: cannot read {path} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config: {path} is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config: {path} must hold a JSON object")
    return data


def zero_stage(par: ParallelConfig, ds: dict[str, Any]) -> int:
    """``parallel.zero_stage``, else the file's ``zero_optimization.stage``, else 2."""
    from_file = (ds.get("zero_optimization") or {}).get("stage")
    if par.zero_stage is not None and from_file is not None and from_file != par.zero_stage:
        raise ConfigError(f"parallel.zero_stage ({par.zero_stage}) contradicts "
                          f"zero_optimization.stage ({from_file}) in parallel.deepspeed_config")
    return par.zero_stage if par.zero_stage is not None else (from_file if from_file is not None
                                                              else 2)


def check_config(cfg: Config) -> None:
    """Refuse every combination that is not exact (or not built) with one ``config error:``."""
    par = cfg.parallel
    if par.zero != "deepspeed":
        if par.deepspeed_config is not None or par.zero_stage is not None:
            raise ConfigError("parallel.deepspeed_config / parallel.zero_stage: only used with "
                              f"parallel.zero=deepspeed (got parallel.zero={par.zero})")
        return
    if par.pipeline_model_parallel_size > 1:
        raise ConfigError(
            "parallel.zero=deepspeed: needs parallel.pipeline_model_parallel_size=1 (got "
            f"{par.pipeline_model_parallel_size}): under our pipeline DeepSpeed ZeRO is silently "
            "wrong (grad norm over stages, loss scaling per stage, overlap_comm); use "
            "parallel.zero=fsdp2 with pipeline parallelism")
    if cfg.latent.method == "mor" and cfg.mor.expert_selection == "threshold":
        raise ConfigError("parallel.zero=deepspeed: mor.expert_selection=threshold can leave the "
                          "shared block unused on one data-parallel rank, and DeepSpeed's "
                          "gradient buckets then differ between ranks; use topk, "
                          "mor.router=token or parallel.zero=fsdp2")
    if par.sequence_parallel:
        raise ConfigError("parallel.zero=deepspeed: parallel.sequence_parallel is not supported "
                          "(its TP-partial gradients need a TP all-reduce before DeepSpeed's "
                          "data-parallel reduction); use parallel.zero=fsdp2")
    ds = read_ds_config(par)
    where = "parallel.deepspeed_config"
    unknown = sorted(set(ds) - {"zero_optimization", *DERIVED_KEYS, *IGNORED_KEYS})
    if unknown:
        raise ConfigError(f"{where}: unsupported keys {unknown}: precision, optimizer and LR "
                          "schedule come from train.* (train.precision, train.lr, ...); only "
                          f"zero_optimization and {list(DERIVED_KEYS)} are read")
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object")
    bad = sorted(set(zero) - set(ZERO_KEYS))
    if bad:
        raise ConfigError(f"{where}: zero_optimization keys {bad} are not supported (offload "
                          f"and ZeRO-3 options included); supported: {list(ZERO_KEYS)}")
    stage = zero_stage(par, ds)
    if stage == 3:
        raise ConfigError(f"parallel.zero_stage=3: {ZERO3_REASON}")
    if stage not in (1, 2):
        raise ConfigError(f"parallel.zero_stage: expected 1 or 2 (DeepSpeed ZeRO stage), got {stage}")
    if stage == 1 and zero.get("overlap_comm"):
        raise ConfigError(f"{where}: zero_optimization.overlap_comm=true with ZeRO stage 1 is "
                          "not exact (measured wrong, DESIGN.md; DeepSpeed's caller-owned "
                          "accumulation refuses it too); set it false or use stage 2")


def ds_config_dict(cfg: Config, ctx: ParallelContext) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize``: our batch geometry and clipping, the
    file's zero_optimization, unmanaged accumulation (``step()`` is the boundary)."""
    tr, ds = cfg.train, read_ds_config(cfg.parallel)
    gas = tr.global_batch_size // (tr.micro_batch_size * ctx.dp_size)
    derived = {"train_batch_size": tr.global_batch_size,
               "train_micro_batch_size_per_gpu": tr.micro_batch_size,
               "gradient_accumulation_steps": gas, "gradient_clipping": tr.clip_grad}
    for key, value in derived.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"parallel.deepspeed_config: {key}={ds[key]} contradicts the "
                              f"value train.* gives ({value}); drop it from the file")
    zero = dict(ds.get("zero_optimization") or {})
    zero["stage"] = zero_stage(cfg.parallel, ds)
    zero.setdefault("overlap_comm", False)
    return {**derived, "zero_optimization": zero, "managed_gradient_accumulation": False,
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**62,
            "wall_clock_breakdown": False}


class _Mpu:
    """Our groups in the shape DeepSpeed queries (``mpu``): at PP = 1 the model-parallel group
    is the tensor-parallel group."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx

    def get_model_parallel_group(self):
        return self.ctx.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size

    def get_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ctx.rank - self.ctx.tp_rank  # TP ranks are consecutive (parallel.py)

    def get_data_parallel_group(self):
        return self.ctx.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_group(self):
        return None


class DeepSpeedOptimizer:
    """The :class:`~megatron_latentcot.training.optimizer.Optimizer` interface over a DeepSpeed
    ZeRO-1/2 engine: the loop calls ``forward_backward``, ``step``, ``skip``; checkpoints go
    through ``state_dict``/``load_state_dict``."""

    sharded = False  # no FSDP2 units (checkpoint files hold full TP pieces of the weights)

    def __init__(self, model: nn.Module, cfg: Config, ctx: ParallelContext):
        import deepspeed
        import torch

        from megatron_latentcot.training.optimizer import no_weight_decay
        from megatron_latentcot.training.reshard import param_layouts

        tr = cfg.train
        self.cfg, self.ctx, self.model = cfg, ctx, model
        self.layouts = param_layouts(model)
        self.stage = zero_stage(cfg.parallel, read_ds_config(cfg.parallel))
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if no_weight_decay(name, tr.decay_norms_and_embeddings) else decay).append(p)
        groups = [{"params": decay, "weight_decay": tr.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=tr.lr,
                                  betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps)
        if ctx.device.type == "cpu":  # its first comm init would JIT-compile a shared-memory
            # all-reduce op (~3 min, a C++ compiler) that only its inference all-reduce uses;
            # DeepSpeed has no switch for it but this table of ops it may load
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=adamw, config=ds_config_dict(cfg, ctx), mpu=_Mpu(ctx),
            dist_init_required=False)

    def prefetch_params(self) -> None:
        """Nothing to gather: ZeRO-1/2 keep whole weights on every rank."""

    def forward_backward(self, stage_forward, microbatches: list[dict]) -> list[dict[str, float]]:
        """Each micro-batch's forward (the whole latent loop) and one ``engine.backward`` of its
        loss over the number of micro-batches (the mean's gradient, as without DeepSpeed)."""
        stats, n = [], len(microbatches)
        for mb in microbatches:
            loss, st = stage_forward(mb, None)
            self.engine.backward(loss / n, scale_wrt_gas=False)
            stats.append(st)
        return stats

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def skip(self) -> None:
        """Drop this iteration's gradients: every rank skips together (the loss is reduced
        first), so nothing is reduced and the next iteration starts clean."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        for k in list(opt.averaged_gradients):
            opt.averaged_gradients[k] = None
        for k in list(getattr(opt, "all_grad_tensors", {})):  # ZeRO-2's accumulation buffers
            opt.all_grad_tensors[k] = None
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        self.engine._unmanaged_backward_count = 0  # (it counts samples for the next step)

    def step(self, lr: float) -> tuple[float, bool]:
        """Reduce, clip (DeepSpeed's ``gradient_clipping``) and apply at ``lr``. Returns (the
        global norm before clipping, applied); a non-finite norm skips the update."""
        for group in self.optimizer.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return norm, math.isfinite(norm)

    def local_state_numel(self) -> int:
        """Elements of AdamW state this rank holds (ZeRO partitions it ~1/DP)."""
        import torch

        return sum(v.numel() for state in self.optimizer.optimizer.state.values()
                   for v in state.values() if torch.is_tensor(v) and v.dim() > 0)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's saved ZeRO partition, fp32 master weights included (exact resume)."""
        states: list[Any] = [None] * self.ctx.dp_size
        states[self.ctx.dp_rank] = state
        self.optimizer.load_state_dict(states, load_optimizer_states=True,
                                       load_from_fp32_weights=True)

    def weights_loaded(self) -> None:
        """Copy the model's weights into DeepSpeed's fp32 partitions (after they were loaded
        from elsewhere, ``train.init_from``)."""
        self.optimizer.refresh_fp32_params()


def resume_refusal(saved: dict[str, Any], cfg: Config, same_layout: bool) -> str | None:
    """Why a checkpoint with config ``saved`` cannot resume under ``cfg`` (None if it can):
    DeepSpeed's ZeRO partitions are flat per-rank buffers the resharder does not read."""
    was = (saved.get("parallel") or {}).get("zero", "fsdp2")
    now = cfg.parallel.zero
    if "deepspeed" not in (was, now):
        return None
    if was != now:
        return (f"saved with parallel.zero={was}, resumed with parallel.zero={now}: converting "
                "optimizer states between DeepSpeed's flat ZeRO partitions and per-parameter "
                f"AdamW states is not supported; resume with parallel.zero={was}")
    old = (saved.get("parallel") or {}).get("zero_stage")
    if not same_layout or old != cfg.parallel.zero_stage:
        return ("a DeepSpeed checkpoint resumes only in the layout and ZeRO stage it was saved "
                "with (its optimizer partitions are per data-parallel rank)")
    return None
