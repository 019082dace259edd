"""``train.init_from``: a new run (iteration 0, fresh optimizer) from another model's weights.

The source is a run directory of this project (any TP/PP/DP layout; ``tools/import_hf.py``
writes one from a transformers checkpoint) or a transformers Llama directory read directly.
Each rank takes its own piece of every full tensor, cut as ``reshard.py`` cuts a checkpoint of
another layout, so any layout starts from the same model. Parameters the source lacks and the
method adds (``NEW_PARAMETERS``: the router, pause embeddings) keep their documented init
(``llama.init_weights``; the router bias ``latent.router_bias_init``). The architecture, the
embedding multiplier and the tokenizer must be the source's: one line names what differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_latentcot.config import Config, ModelConfig
from megatron_latentcot.model.export import VOCAB_ROWS
from megatron_latentcot.training.checkpoint import CheckpointError

if TYPE_CHECKING:
    from megatron_latentcot.parallel import ParallelContext

# Stage parameters a method adds to a plain Llama: kept at their init when the source lacks them.
NEW_PARAMETERS = ("router.", "pause_embeddings.")
# ModelConfig fields the weights depend on (init_std, max_position_embeddings and the vocabulary
# padding do not: rows are matched by token, and the predicted vocabularies compared).
ARCHITECTURE = ("hidden_size", "num_layers", "num_attention_heads", "kv_heads", "ffn_hidden_size",
                "rope_theta", "norm_eps", "tie_embeddings", "embedding_multiplier", "rope_scaling",
                "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_position_embeddings")


@dataclass
class Source:
    """Weights to start from: ``full(name)`` is a stage parameter's full (TP = 1) tensor, or
    None when the source has no such parameter."""

    path: Path
    model: ModelConfig
    tokenizer: str | None  # fingerprint of the tokenizer it was trained with, when known
    rows: int | None  # embedding rows (padded vocabulary), when known
    full: Callable[[str], torch.Tensor | None]
    what: str  # for the log line


def _model_config(section: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in section.items() if k in known})


def fused_parts(model: torch.nn.Module) -> dict[str, list[str]]:
    """Fused stage parameter -> the logical weights it concatenates (TP = 1 order)."""
    from megatron_latentcot.model.llama import FusedColumnParallelLinear

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedColumnParallelLinear):
            base = name.rsplit(".", 1)[0]
            out[f"{name}.weight"] = [f"{base}.{part}.weight" for part in module.parts]
    return out


def _hf_source(path: Path, model: torch.nn.Module) -> Source:
    from megatron_latentcot.data.tokenizer import build_tokenizer
    from megatron_latentcot.model import hf_import

    m = _model_config(hf_import.model_fields_from_hf(hf_import.read_hf_config(path),
                                                     path / hf_import.HF_CONFIG))
    hf, origin = hf_import.read_hf_weights(path)
    logical = hf_import.logical_weights(hf, origin, m)
    fused = fused_parts(model)
    found = hf_import.find_tokenizer(path)
    fingerprint = build_tokenizer(*found).fingerprint if found else None

    def full(name: str) -> torch.Tensor | None:
        if name in fused:
            parts = [logical.get(p) for p in fused[name]]
            return None if any(p is None for p in parts) else torch.cat(parts)
        return logical.get(name)

    return Source(path, m, fingerprint, m.predicted_vocab_size, full, "transformers checkpoint")


def _run_source(path: Path, layouts: dict[str, tuple[str, Any]]) -> Source:
    from megatron_latentcot.inference.loading import LoadError, resolve_checkpoint
    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.training.reshard import RankFiles

    try:
        ckpt_dir = resolve_checkpoint(path)
    except LoadError as e:
        raise CheckpointError(f"train.init_from: {e} (nor a transformers directory with "
                              "config.json)") from None
    manifest = ckpt.read_manifest(ckpt_dir)
    files = RankFiles(ckpt_dir, manifest)
    problems = files.verify(files.ranks)
    if problems:
        raise CheckpointError(problems[0])
    holders = files.holders(files.model_states())

    def full(name: str) -> torch.Tensor | None:
        return files.assemble(name, holders[name], layouts) if name in holders else None

    model = _model_config((manifest.get("config") or {}).get("model") or {})
    return Source(ckpt_dir, model, manifest.get("tokenizer"), manifest.get("vocab_size"), full,
                  f"iteration {manifest.get('iteration')}")


def check_compatible(source: Source, cfg: Config, rows: int, fingerprint: str) -> None:
    """The run's model and tokenizer are the source's (one line naming every difference).

    The predicted vocabulary (``model.predicted_vocab_size``, else every one of the ``rows``)
    must be the source's: padding rows never predicted there must not be predicted here."""
    diff = [f"model.{f}: {getattr(source.model, f)!r} -> {getattr(cfg.model, f)!r}"
            for f in ARCHITECTURE if getattr(source.model, f) != getattr(cfg.model, f)]
    predicted = (source.model.predicted_vocab_size or source.rows,
                 cfg.model.predicted_vocab_size or rows)
    if None not in predicted and predicted[0] != predicted[1]:
        diff.append(f"predicted vocabulary: {predicted[0]} -> {predicted[1]} (set "
                    f"model.predicted_vocab_size={predicted[0]})")
    if diff:
        raise CheckpointError(
            f"train.init_from={source.path}: the run's model differs from the source's "
            f"({'; '.join(diff)}); use the source's model section (tools/import_hf.py writes "
            "it; an imported model's model.embedding_multiplier is 1.0, the scale its "
            "embeddings were trained at)")
    if source.tokenizer is not None and source.tokenizer != fingerprint:
        raise CheckpointError(f"train.init_from={source.path}: trained with another tokenizer "
                              f"than data.tokenizer_model={cfg.data.tokenizer_model}")


def _fit_rows(name: str, full: torch.Tensor, rows: int, keep: int | None) -> torch.Tensor:
    """A vocabulary weight with ``rows`` rows: the first ``keep`` (the predicted vocabulary)
    copied, padding rows zero."""
    if full.shape[0] == rows:
        return full
    if keep is None or full.shape[0] < keep:
        raise CheckpointError(f"train.init_from: {name} has {full.shape[0]} rows, this run "
                              f"{rows}; set model.vocab_size={full.shape[0]} to keep the source's "
                              "padding")
    out = full.new_zeros(rows, *full.shape[1:])
    out[:keep] = full[:keep]
    return out


@torch.no_grad()
def initialize(path: str | Path, cfg: Config, ctx: ParallelContext, model: torch.nn.Module,
               layouts: dict[str, tuple[str, Any]], rows: int, fingerprint: str) -> str:
    """Copy the source's weights into this rank's ``model`` (FSDP2-sharded or not); returns
    the log line. ``layouts``: ``reshard.param_layouts`` of the model before sharding; ``rows``:
    the run's embedding rows; ``fingerprint``: the run's tokenizer's. Raises CheckpointError."""
    from megatron_latentcot.model import hf_import
    from megatron_latentcot.training.reshard import local_piece

    p = Path(path)
    source = _hf_source(p, model) if hf_import.is_hf_checkpoint(p) else _run_source(p, layouts)
    check_compatible(source, cfg, rows, fingerprint)
    kept, copied = [], 0
    for name, target in model.state_dict().items():
        if not torch.is_tensor(target):  # megatron layers' empty ``_extra_state``
            continue
        full = source.full(name)
        if full is None:
            if name.startswith(NEW_PARAMETERS):
                kept.append(name)
                continue
            raise CheckpointError(f"train.init_from={source.path}: no tensor {name} (a "
                                  "different model?)")
        if name.endswith(VOCAB_ROWS):
            full = _fit_rows(name, full, rows, cfg.model.predicted_vocab_size)
        kind, info = layouts[name]
        sharded = hasattr(target, "to_local")
        local = target.to_local() if sharded else target
        piece = local_piece(kind, info, full.to(local.dtype), ctx, sharded)
        if piece.shape != local.shape:
            raise CheckpointError(f"train.init_from={source.path}: {name} has full shape "
                                  f"{tuple(full.shape)}, this rank holds {tuple(local.shape)} of "
                                  "it (a different model shape?)")
        local.copy_(piece)
        copied += 1
    new = f"; kept their init: {', '.join(sorted(kept))}" if kept else ""
    return (f"initialised from {source.path} ({source.what}): {copied} tensors on rank "
            f"{ctx.rank}{new}; iteration 0, fresh optimizer")
