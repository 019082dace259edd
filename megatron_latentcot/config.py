"""Run configuration: dataclasses loaded from YAML with ``section.field=value`` overrides.

Every field is type-checked and cross-validated up front, so a bad config fails with one
``ConfigError`` naming the field instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_latentcot.data.tokenizer import TokenizerError, canonical_tokenizer_type

METHODS = ("vanilla", "adaptive", "latent_fixed", "looped", "pause", "pondering", "ponderlm2",
           "mor")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type, or inconsistent."""


@dataclass
class ModelConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # key/value heads (GQA); None = one per query head
    ffn_hidden_size: int = 688
    # Embedding rows. None = the tokenizer's vocab padded to make_vocab_size_divisible_by * TP.
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Truncated-normal init std; None = sqrt(2 / (5 * hidden_size)). Output projections are
    # further divided by sqrt(2 * num_layers).
    init_std: float | None = None
    # Token embeddings are multiplied by this. None = sqrt(2.5 * hidden_size), which puts them
    # on the scale of the final-norm hidden states that latent steps feed back.
    embedding_multiplier: float | None = 1.0
    # RoPE frequency scaling as in transformers: None, "linear" (inv_freq / factor) or "llama3"
    # (Llama-3.1's: low frequencies / factor, high kept, smooth in between). The rope_* fields
    # below are its parameters (null when unused; set together by tools/import_hf.py).
    rope_scaling: str | None = None
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    # Logits of embedding rows >= this are -inf: the rows an imported vocabulary was padded with
    # (to the TP multiple) are never predicted, so the loss equals the source model's. None =
    # every row is predicted (from scratch, padding rows learn to be unlikely, as in Megatron).
    predicted_vocab_size: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class LatentConfig:
    method: str = "vanilla"  # one of METHODS
    max_steps: int = 4  # K_max: all passes including the token pass (= l_max + 1)
    tau: float = 0.1  # continue to step k+1 iff p_reach^(k+1) > tau
    adaptive_loss_weight: float = 0.1  # lambda
    adaptive_loss_beta: float = 1.0  # beta
    router_bias_init: float = 0.0  # sigmoid(0) = 0.5: gates start undecided
    attention_backend: str = "sdpa"  # "sdpa" (CPU + reference) or "flex" (GPU)
    compact: bool = True  # run each step on the active tokens only
    # Pondering's expected embedding softmax(LMHead(h)) @ (E * s): "sqrt_hidden" s = sqrt(d)
    # [prior, PonderLM]; "embedding_multiplier" s = model.embedding_multiplier, the token
    # embeddings' own scale (what runs before this switch used).
    pondering_embedding_scale: str = "sqrt_hidden"
    # PonderLM-2's Jacobi passes J over the interleaved sequence (docs/baselines_ponderlm2_mor.md
    # 1.3): the authors' evaluation J; their training draws J from {2, 3} per micro-batch, fixed
    # here so every run (and every TP rank) runs the same passes.
    jacobi_iterations: int = 3


@dataclass
class MoRConfig:
    """Mixture-of-Recursions (``latent.method: mor``, docs/baselines_ponderlm2_mor.md 2, 3.2):
    unique first and last layers around a block of floor((L-2)/N_r) layers applied N_r times."""

    num_recursion: int = 3  # N_r (latent.max_steps must equal it: the step count)
    router: str = "expert"  # "expert" (a top-k router per recursion) or "token" (one depth each)
    capacity: list[float] | None = None  # expert c_r, non-increasing in (0, 1]; None = (N_r-r+1)/N_r
    alpha: float | None = None  # gate scale: None = the authors' 0.1 (expert) / 1.0 (token)
    aux_coeff: float = 0.001  # expert: x the BCE of the router logits vs selection, summed over r
    bal_coeff: float = 0.1  # token: x the balancing loss sum_r P_r f_r
    z_coeff: float = 1e-5  # token: x the router z-loss mean (logsumexp)^2
    kv_sharing: bool = False  # recursion 1's K/V read by later recursions (not implemented yet)
    # expert: "topk" (the authors' training rule: per row the k_r best, sees future tokens) or
    # "threshold" (continue iff sigmoid(a) >= 0.5: causal, the rule decoding always uses)
    expert_selection: str = "topk"
    # Test-only: "replace" (h <- F(h) on the selected tokens) instead of the authors' "weighted"
    # combine; with capacity 1 everywhere the model is then a middle-cycle looped model.
    combine: str = "weighted"


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # Layers per pipeline stage; None = an even split.
    pipeline_layers: list[int] | None = None
    # Order of micro-batch units on each stage (training/schedules.py): "1f1b" (activations of
    # at most K x PP - stage (micro-batch, step) units alive, whatever the number of
    # micro-batches) or "gpipe" (every forward, then every backward: all alive).
    pipeline_schedule: str = "1f1b"
    # Optimizer-state sharding over the data-parallel group: "fsdp2" (ZeRO via FSDP2), "none" or
    # "deepspeed" (DeepSpeed ZeRO-1/2, PP = 1 only: training/deepspeed_zero.py).
    zero: str = "fsdp2"
    deepspeed_config: str | None = None  # a ds_config.json (its zero_optimization is read)
    zero_stage: int | None = None  # DeepSpeed ZeRO stage (1 or 2); None = the file's, else 2
    backend: str = "auto"  # "auto" (nccl with CUDA, else gloo), "nccl" or "gloo"
    timeout_minutes: float = 10.0


@dataclass
class DataConfig:
    # Megatron-style: ["prefix"] or a blend ["0.7", "prefix_a", "0.3", "prefix_b"].
    data_path: list[str | float] = field(default_factory=list)
    split: str = "969,30,1"
    seq_length: int = 256
    tokenizer_type: str = "sentencepiece"  # a name of data.tokenizer.TOKENIZER_TYPES
    tokenizer_model: str | None = None
    cache_dir: str | None = None  # where sample indices are cached; None = beside the data
    reset_attention_mask: bool = False  # no attention across EOD inside a packed sample
    eod_mask_loss: bool = False
    # A separate validation prefix (e.g. a fixed set of held-out documents). When set, all of
    # data_path trains and ``split`` is not used.
    valid_path: str | None = None
    # Out-of-domain held-out evaluation data (a prefix), reported next to validation.
    heldout_path: str | None = None


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"  # "cosine", "linear" or "constant"
    lr_decay_iters: int | None = None  # None = train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    decay_norms_and_embeddings: bool = False
    seed: int = 1234
    # "fp32" or "bf16": bf16 matmuls/attention (autocast; FSDP2 gathers in bf16), fp32 master
    # weights, gradients, reductions, optimizer state, routing and losses (Megatron's --bf16)
    precision: str = "fp32"
    recompute: bool = False  # activation recompute per transformer block
    log_interval: int = 10
    eval_interval: int = 50
    eval_iters: int = 10
    save: str | None = None
    save_interval: int = 0  # 0 = save only at the end
    load: str | None = None
    # Start a new run (iteration 0, fresh optimizer and schedule) from the weights of a run
    # directory (e.g. one written by tools/import_hf.py) or a transformers Llama directory.
    # Parameters the source lacks (router, pause embeddings) keep their usual init. Ignored when
    # train.save already holds this run's checkpoints (a requeue resumes from those).
    init_from: str | None = None
    # Checkpoints already in train.save are resumed when their config is this one's (else the
    # run is refused); true deletes them at start and trains from scratch (or train.load).
    overwrite: bool = False
    keep_last: int = 2
    # A failed save (full disk, unwritable directory) stops training; true = warn at every
    # failed save and keep training unsaved.
    continue_on_save_error: bool = False
    # Stop after this many iterations in a row with a non-finite loss or gradient (each one's
    # update is skipped); 0 = never stop.
    max_skipped_in_a_row: int = 10
    # Log an iteration (and its samples) whose loss exceeds this factor x the mean of the last
    # loss_spike_window losses; 0 disables.
    loss_spike_factor: float = 2.0
    loss_spike_window: int = 20
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_mode: str = "offline"
    peak_tflops: float | None = None  # per device, for MFU; None = look the device up


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    mor: MoRConfig = field(default_factory=MoRConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _check_value(where: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` (int -> float only), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(where, value, option)
            except ConfigError as e:
                # The error of the option the value's type is (a NaN for ``str | float``) says
                # more than the first option's.
                same_type = isinstance(option, type) and isinstance(value, option)
                errors.insert(0 if same_type else len(errors), str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected null")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")  # a bug in this module


def _build_section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{name}: unknown field(s) {', '.join(map(str, unknown))}; "
            f"expected some of: {', '.join(sorted(known))}"
        )
    kwargs = {k: _check_value(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(raw: Any, source: str = "config") -> Config:
    """Build and validate a Config from a nested mapping (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(_SECTIONS)}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {', '.join(map(str, unknown))}; "
            f"expected some of: {', '.join(_SECTIONS)}"
        )
    hints = typing.get_type_hints(Config)
    sections = {name: _build_section(name, hints[name], raw.get(name)) for name in _SECTIONS}
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a nested mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. train.lr=1e-3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"override {item!r}: {parts[0]} is not a section")
        section[parts[1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    raw: Any = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with sections {', '.join(_SECTIONS)}")
    return config_from_dict(apply_overrides(raw, list(overrides or [])), source)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# -- which method runs under which layout ------------------------------------------------------
# The one table: config validation (so --print-config and the planner), the scheduler and the
# Slurm launcher's planner check all read it. With K_max = 1 (and always for vanilla) every
# method is the plain one-pass model, which runs under every layout. With K_max > 1 a method
# does not run under a layout that has all the features of one of its rows:
#   pp: parallel.pipeline_model_parallel_size > 1   sp: parallel.sequence_parallel = true
#   masked: latent.compact = false (the latent loop computes halted tokens and masks them)
LAYOUT_FEATURES = {"pp": "parallel.pipeline_model_parallel_size > 1",
                   "sp": "parallel.sequence_parallel=true", "masked": "latent.compact=false"}
LAYOUT_REFUSALS: tuple[tuple[tuple[str, ...], frozenset[str], str], ...] = (
    # (methods, features that together refuse them, why)
    (("pause", "pondering"), frozenset({"pp"}), "its K passes are not steps the pipeline can "
     "drive (only the latent loop and looped are)"),
    (("pause", "pondering"), frozenset({"sp"}), "its K passes do not run on token shards"),
    (("ponderlm2",), frozenset({"pp"}), "its passes over the interleaved sequence are not steps "
     "the pipeline can drive (only the latent loop and looped are)"),
    (("ponderlm2",), frozenset({"sp"}), "its passes over the interleaved sequence do not run on "
     "token shards"),
    (("mor",), frozenset({"pp"}), "its shared recursion block would have to span stages and "
     "loop back"),
    (("mor",), frozenset({"sp"}), "its per-row top-k needs every token's router score on every "
     "rank (not implemented)"),
    (("mor",), frozenset({"masked"}), "it always runs only the selected tokens"),
    (("adaptive", "latent_fixed", "looped"), frozenset({"pp", "sp"}), "the latent pipeline sends "
     "whole activations between stages, not token shards"),
    (("adaptive", "latent_fixed"), frozenset({"pp", "masked"}), "the latent pipeline sends only "
     "the surviving tokens between stages"),
    (("adaptive", "latent_fixed"), frozenset({"sp", "masked"}), "sequence parallelism re-splits "
     "only the surviving tokens"),
)


def layout_features(cfg: Config) -> frozenset[str]:
    """The features (keys of LAYOUT_FEATURES) of this config's layout."""
    par = cfg.parallel
    on = {"pp": par.pipeline_model_parallel_size > 1, "sp": par.sequence_parallel,
          "masked": not cfg.latent.compact}
    return frozenset(f for f, yes in on.items() if yes)


def layout_refusal(cfg: Config) -> str | None:
    """Why ``cfg``'s method does not run under its layout (one line naming the fields), or None."""
    lat = cfg.latent
    if lat.method == "vanilla" or (lat.max_steps == 1 and lat.method != "mor"):
        return None  # (MoR keeps its first/block/last structure at N_r = 1)
    features = layout_features(cfg)
    for methods, needs, why in LAYOUT_REFUSALS:
        if lat.method in methods and needs <= features:
            fields = " and ".join(LAYOUT_FEATURES[f] for f in LAYOUT_FEATURES if f in needs)
            return (f"latent.method={lat.method} with latent.max_steps={lat.max_steps} does not "
                    f"run with {fields}: {why}")
    return None


def check_layout(cfg: Config) -> None:
    """Raise ConfigError when the method does not run under the layout (LAYOUT_REFUSALS)."""
    refusal = layout_refusal(cfg)
    _require(refusal is None, refusal or "")


def validate(cfg: Config) -> None:
    """Cross-field checks; each failure names the field(s) and the expected value."""
    m, lat, par, data, tr = cfg.model, cfg.latent, cfg.parallel, cfg.data, cfg.train
    for name in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                 "max_position_embeddings", "make_vocab_size_divisible_by"):
        _require(getattr(m, name) > 0, f"model.{name}: expected a positive integer")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size ({m.hidden_size}) must be divisible by "
             f"model.num_attention_heads ({m.num_attention_heads})")
    _require(m.head_dim % 2 == 0, f"model head dim ({m.head_dim}) must be even for RoPE")
    _require(m.kv_heads > 0 and m.num_attention_heads % m.kv_heads == 0,
             f"model.num_query_groups ({m.num_query_groups}) must divide "
             f"model.num_attention_heads ({m.num_attention_heads})")
    _require(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size: expected > 0 or null")
    _require(m.rope_theta > 0 and m.norm_eps > 0, "model.rope_theta and model.norm_eps: > 0")
    _require(m.init_std is None or m.init_std > 0, "model.init_std: expected > 0 or null")
    _require(m.embedding_multiplier is None or m.embedding_multiplier > 0,
             "model.embedding_multiplier: expected > 0 or null")
    _check_rope_scaling(m)
    _require(m.predicted_vocab_size is None or (m.predicted_vocab_size > 0 and (
        m.vocab_size is None or m.predicted_vocab_size <= m.vocab_size)),
        f"model.predicted_vocab_size ({m.predicted_vocab_size}): expected null or in "
        f"[1, model.vocab_size ({m.vocab_size})]")

    _require(lat.method in METHODS, f"latent.method: expected one of {METHODS}, got {lat.method!r}")
    _require(lat.max_steps >= 1, f"latent.max_steps: expected >= 1, got {lat.max_steps}")
    _require(0.0 <= lat.tau < 1.0, f"latent.tau: expected 0 <= tau < 1, got {lat.tau}")
    _require(lat.adaptive_loss_weight >= 0, "latent.adaptive_loss_weight: expected >= 0")
    _require(lat.adaptive_loss_beta >= 0, "latent.adaptive_loss_beta: expected >= 0")
    _require(lat.attention_backend in ("sdpa", "flex"),
             f"latent.attention_backend: expected 'sdpa' or 'flex', got {lat.attention_backend!r}")
    _require(lat.pondering_embedding_scale in ("sqrt_hidden", "embedding_multiplier"),
             "latent.pondering_embedding_scale: expected 'sqrt_hidden' or 'embedding_multiplier', "
             f"got {lat.pondering_embedding_scale!r}")
    _require(lat.jacobi_iterations >= 0,
             f"latent.jacobi_iterations: expected >= 0, got {lat.jacobi_iterations}")
    if lat.method == "mor":
        _validate_mor(cfg)

    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    _require(tp >= 1, f"parallel.tensor_model_parallel_size: expected >= 1, got {tp}")
    _require(pp >= 1, f"parallel.pipeline_model_parallel_size: expected >= 1, got {pp}")
    _require(m.num_attention_heads % tp == 0,
             f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
             f"parallel.tensor_model_parallel_size ({tp})")
    _require(m.kv_heads % tp == 0,
             f"model.num_query_groups ({m.kv_heads}) must be divisible by "
             f"parallel.tensor_model_parallel_size ({tp})")
    _require(m.ffn_hidden_size % tp == 0,
             f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by "
             f"parallel.tensor_model_parallel_size ({tp})")
    _require(m.vocab_size is None or m.vocab_size % tp == 0,
             f"model.vocab_size ({m.vocab_size}) must be divisible by "
             f"parallel.tensor_model_parallel_size ({tp})")
    if par.pipeline_layers is None:
        _require(m.num_layers % pp == 0,
                 f"model.num_layers ({m.num_layers}) must be divisible by "
                 f"parallel.pipeline_model_parallel_size ({pp}), or set parallel.pipeline_layers")
    else:
        _require(len(par.pipeline_layers) == pp and all(n > 0 for n in par.pipeline_layers)
                 and sum(par.pipeline_layers) == m.num_layers,
                 f"parallel.pipeline_layers ({par.pipeline_layers}): expected {pp} positive "
                 f"counts summing to model.num_layers ({m.num_layers})")
    _require(not (m.tie_embeddings and pp > 1),
             "model.tie_embeddings: not supported with parallel.pipeline_model_parallel_size > 1 "
             "(the embedding and the LM head live on different stages)")
    _require(not par.sequence_parallel or tp > 1,
             "parallel.sequence_parallel: needs parallel.tensor_model_parallel_size > 1")
    _require(not par.sequence_parallel
             or (cfg.train.micro_batch_size * cfg.data.seq_length) % tp == 0,
             f"parallel.sequence_parallel: train.micro_batch_size x data.seq_length must be "
             f"divisible by parallel.tensor_model_parallel_size ({tp})")
    _require(par.pipeline_schedule in ("1f1b", "gpipe"), "parallel.pipeline_schedule: expected "
             f"'1f1b' or 'gpipe', got {par.pipeline_schedule!r}")
    _require(par.zero in ("fsdp2", "none", "deepspeed"), f"parallel.zero: expected 'fsdp2', "
             f"'none' or 'deepspeed', got {par.zero!r}")
    from megatron_latentcot.training.deepspeed_zero import check_config as check_deepspeed

    check_deepspeed(cfg)
    _require(par.backend in ("auto", "nccl", "gloo"),
             f"parallel.backend: expected 'auto', 'nccl' or 'gloo', got {par.backend!r}")
    _require(par.timeout_minutes > 0, "parallel.timeout_minutes: expected > 0")
    check_layout(cfg)

    _require(data.seq_length > 0, f"data.seq_length: expected > 0, got {data.seq_length}")
    _require(data.seq_length <= m.max_position_embeddings,
             f"data.seq_length ({data.seq_length}) exceeds model.max_position_embeddings "
             f"({m.max_position_embeddings})")
    if lat.method == "pause":
        _require(data.seq_length * lat.max_steps <= m.max_position_embeddings,
                 f"data.seq_length x latent.max_steps ({data.seq_length * lat.max_steps}) exceeds "
                 f"model.max_position_embeddings ({m.max_position_embeddings}): pause tokens "
                 "lengthen the sequence K-fold")
    try:  # the one table of names tools/preprocess_data.py accepts too (Megatron-LM's included)
        canonical_tokenizer_type(data.tokenizer_type)
    except TokenizerError as e:
        raise ConfigError(f"data.tokenizer_type: {e}") from None
    parse_split(data.split)
    if data.data_path:
        parse_blend(data.data_path)

    _require(tr.micro_batch_size > 0, "train.micro_batch_size: expected > 0")
    _require(tr.global_batch_size > 0 and tr.global_batch_size % tr.micro_batch_size == 0,
             f"train.global_batch_size ({tr.global_batch_size}) must be a positive multiple of "
             f"train.micro_batch_size ({tr.micro_batch_size})")
    _require(tr.train_iters >= 0, "train.train_iters: expected >= 0")
    _require(tr.lr > 0 and 0 <= tr.min_lr <= tr.lr,
             f"train.lr ({tr.lr}) and train.min_lr ({tr.min_lr}): expected 0 <= min_lr <= lr, lr > 0")
    _require(tr.lr_warmup_iters >= 0, "train.lr_warmup_iters: expected >= 0")
    _require(tr.lr_decay_style in ("cosine", "linear", "constant"),
             f"train.lr_decay_style: expected cosine, linear or constant, got {tr.lr_decay_style!r}")
    _require(tr.weight_decay >= 0, "train.weight_decay: expected >= 0")
    _require(0 <= tr.adam_beta1 < 1 and 0 <= tr.adam_beta2 < 1,
             "train.adam_beta1 / train.adam_beta2: expected in [0, 1)")
    _require(tr.adam_eps > 0, "train.adam_eps: expected > 0")
    _require(tr.clip_grad >= 0, "train.clip_grad: expected >= 0 (0 disables)")
    _require(tr.precision in ("fp32", "bf16"),
             f"train.precision: expected 'fp32' or 'bf16', got {tr.precision!r}")
    _require(tr.log_interval > 0 and tr.eval_interval >= 0 and tr.eval_iters >= 0,
             "train.log_interval > 0, train.eval_interval >= 0, train.eval_iters >= 0")
    _require(tr.save_interval >= 0 and tr.keep_last >= 1,
             "train.save_interval >= 0 and train.keep_last >= 1")
    _require(not (tr.init_from and tr.load),
             f"train.init_from ({tr.init_from}) and train.load ({tr.load}): set one (init_from "
             "starts a new run from weights, load resumes a run)")
    _require(tr.max_skipped_in_a_row >= 0, "train.max_skipped_in_a_row: expected >= 0 (0 = never stop)")
    _require(tr.loss_spike_factor == 0 or tr.loss_spike_factor > 1,
             f"train.loss_spike_factor: expected 0 (off) or > 1, got {tr.loss_spike_factor}")
    _require(tr.loss_spike_window >= 2, "train.loss_spike_window: expected >= 2")
    _require(tr.wandb_mode in ("offline", "online", "disabled"),
             f"train.wandb_mode: expected offline, online or disabled, got {tr.wandb_mode!r}")


ROPE_SCALING_FIELDS = {  # rope_scaling -> the rope_* fields it needs
    None: (),
    "linear": ("rope_scaling_factor",),
    "llama3": ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
               "rope_original_max_position_embeddings"),
}
_ROPE_PARAMS = ROPE_SCALING_FIELDS["llama3"]


def mor_capacities(mor: MoRConfig) -> list[float]:
    """c_r of every recursion: ``mor.capacity`` or the authors' default (N_r - r + 1) / N_r."""
    n = mor.num_recursion
    return list(mor.capacity) if mor.capacity is not None else [(n - r) / n for r in range(n)]


def mor_base_depth(num_layers: int, num_recursion: int) -> int:
    """Layers of MoR's shared block: floor((L - 2) / N_r) (middle-cycle sharing)."""
    return (num_layers - 2) // num_recursion


def _validate_mor(cfg: Config) -> None:
    mor, lat, m = cfg.mor, cfg.latent, cfg.model
    n = mor.num_recursion
    _require(n >= 1, f"mor.num_recursion: expected >= 1, got {n}")
    _require(lat.max_steps == n, f"latent.max_steps ({lat.max_steps}) must equal "
             f"mor.num_recursion ({n}) for latent.method=mor (its steps are the recursions)")
    _require(mor_base_depth(m.num_layers, n) >= 1,
             f"model.num_layers ({m.num_layers}): mor needs >= 2 + mor.num_recursion ({n}) "
             "layers (a first, a last and a shared block of >= 1 layer)")
    _require(mor.router in ("expert", "token"),
             f"mor.router: expected 'expert' or 'token', got {mor.router!r}")
    caps = mor_capacities(mor)
    _require(len(caps) == n and all(0 < c <= 1 for c in caps)
             and all(a >= b for a, b in zip(caps, caps[1:])),
             f"mor.capacity ({mor.capacity}): expected {n} non-increasing numbers in (0, 1]")
    _require(mor.alpha is None or mor.alpha > 0, f"mor.alpha: expected > 0 or null, got {mor.alpha}")
    for name in ("aux_coeff", "bal_coeff", "z_coeff"):
        _require(getattr(mor, name) >= 0, f"mor.{name}: expected >= 0, got {getattr(mor, name)}")
    _require(not mor.kv_sharing, "mor.kv_sharing: true is not implemented yet (only "
             "recursion-wise caching); expected false")
    _require(mor.expert_selection in ("topk", "threshold"), "mor.expert_selection: expected "
             f"'topk' or 'threshold', got {mor.expert_selection!r}")
    _require(mor.combine in ("weighted", "replace"),
             f"mor.combine: expected 'weighted' or 'replace', got {mor.combine!r}")


def _check_rope_scaling(m: ModelConfig) -> None:
    """model.rope_scaling names a known scheme and exactly its rope_* fields are set (> 0)."""
    _require(m.rope_scaling in ROPE_SCALING_FIELDS,
             f"model.rope_scaling: expected null, 'linear' or 'llama3', got {m.rope_scaling!r}")
    needed = ROPE_SCALING_FIELDS[m.rope_scaling]
    for name in _ROPE_PARAMS:
        value = getattr(m, name)
        if name in needed:
            _require(value is not None and value > 0,
                     f"model.{name}: expected > 0 with model.rope_scaling={m.rope_scaling}")
        else:
            _require(value is None, f"model.{name}: must be null with "
                     f"model.rope_scaling={m.rope_scaling} (it is unused)")
    if m.rope_scaling == "llama3":
        _require(m.rope_high_freq_factor > m.rope_low_freq_factor,
                 "model.rope_high_freq_factor must exceed model.rope_low_freq_factor")


def parse_split(split: str) -> tuple[float, float, float]:
    """'969,30,1' -> normalised (train, valid, test) fractions."""
    try:
        parts = [float(p) for p in split.split(",")]
    except ValueError:
        raise ConfigError(f"data.split ({split!r}): expected three numbers like '969,30,1'") from None
    parts += [0.0] * (3 - len(parts))
    _require(len(parts) == 3 and all(p >= 0 and math.isfinite(p) for p in parts) and sum(parts) > 0,
             f"data.split ({split!r}): expected up to three non-negative numbers with a positive sum")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def parse_blend(paths: list[str | float]) -> tuple[list[str], list[float] | None]:
    """['p'] -> (['p'], None); [0.7, 'a', '0.3', 'b'] -> (['a', 'b'], [0.7, 0.3])."""
    if len(paths) == 1:
        _require(isinstance(paths[0], str), f"data.data_path ({paths}): expected a prefix")
        return [str(paths[0])], None
    _require(len(paths) % 2 == 0,
             f"data.data_path ({paths}): expected one prefix or weight/prefix pairs")
    weights, prefixes = [], []
    for w, p in zip(paths[0::2], paths[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(f"data.data_path: blend weight {w!r} is not a number") from None
        _require(weight >= 0 and math.isfinite(weight),
                 f"data.data_path: blend weight {w!r} must be >= 0")
        _require(isinstance(p, str), f"data.data_path: expected a prefix after weight {w!r}, "
                 f"got {p!r}")
        weights.append(weight)
        prefixes.append(str(p))
    _require(sum(weights) > 0, f"data.data_path ({paths}): blend weights sum to zero")
    return prefixes, weights
