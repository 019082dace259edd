"""Load a model into one process (TP = PP = 1) for inference, evaluation and export.

Sources:

- a Trainer checkpoint (``<save>`` with ``latest``, or one ``iter_*`` directory) saved with any
  layout: per-rank files ``rank_XXXXX.pt`` whose ``payload["model"]`` is that rank's state dict.
  Pipeline stages are merged by name (layers keep their global index); tensor-parallel slices
  are stitched along each weight's ``partition_dim`` (fused QKV / gate-up weights part by part);
  FSDP2 (``parallel.zero=fsdp2`` with DP > 1) data-parallel shards are concatenated on dim 0;
- an exported latent model (:func:`megatron_latentcot.model.export.save_latent_export`):
  ``model.safetensors`` of logical weights + ``latent_config.json``.

The resolved config comes from the checkpoint's ``manifest.json`` (or the export's JSON).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_latentcot.config import Config, ParallelConfig, config_from_dict
from megatron_latentcot.data.tokenizer import Tokenizer
from megatron_latentcot.model.latent import LatentStepScheduler
from megatron_latentcot.model.llama import LlamaStage, logical_parameters
from megatron_latentcot.parallel import ParallelContext
from megatron_latentcot.training.reshard import param_layouts  # noqa: F401  (re-exported)

LATENT_CONFIG = "latent_config.json"
WEIGHTS = "model.safetensors"


class LoadError(RuntimeError):
    """A checkpoint or export cannot be loaded into one process."""


@dataclass
class LoadedModel:
    """A single-process model with its config, scheduler and (when found) tokenizer."""

    cfg: Config
    stage: LlamaStage
    vocab_size: int  # embedding rows (the tokenizer's vocabulary, padded)
    tokenizer: Tokenizer | None = None
    source: dict[str, Any] = field(default_factory=dict)  # manifest or export metadata
    _scheduler: LatentStepScheduler | None = field(default=None, repr=False)

    @property
    def scheduler(self) -> LatentStepScheduler:
        if self._scheduler is None:
            self._scheduler = LatentStepScheduler(self.stage, self.cfg)
        return self._scheduler

    @property
    def device(self) -> torch.device:
        return next(self.stage.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.stage.parameters()).dtype

    @property
    def method(self) -> str:
        return self.cfg.latent.method

    @property
    def eod(self) -> int | None:
        return self.tokenizer.eod if self.tokenizer is not None else None

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a LoadError saying which file was looked for (text in, text out)."""
        if self.tokenizer is None:
            raise LoadError(f"{self.source.get('path', 'the model')}: the tokenizer it was "
                            f"trained with ({self.cfg.data.tokenizer_model}) was not found; "
                            "pass --tokenizer-model")
        return self.tokenizer


# -- building -------------------------------------------------------------------------------

def config_from_saved(raw: dict[str, Any], source: str) -> Config:
    """A Config from a saved config dict, dropping fields this version does not know (warned).

    Checkpoints outlive code: a field added or removed since they were written must not stop
    a model from loading for inference.
    """
    import dataclasses
    import typing
    import warnings

    hints = typing.get_type_hints(Config)
    clean: dict[str, Any] = {}
    for section, values in (raw or {}).items():
        if section not in hints:
            warnings.warn(f"{source}: ignoring unknown config section {section!r}", stacklevel=2)
            continue
        known = {f.name for f in dataclasses.fields(hints[section])}
        dropped = sorted(set(values or {}) - known)
        if dropped:
            warnings.warn(f"{source}: ignoring unknown {section} field(s) {dropped}", stacklevel=2)
        clean[section] = {k: v for k, v in (values or {}).items() if k in known}
    return config_from_dict(clean, source)


def world_of_one() -> ParallelContext:
    """Start (or reuse) a one-process gloo world with TP = PP = 1 for megatron's layers."""
    import torch.distributed as dist

    from megatron_latentcot.parallel import init_distributed

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise LoadError("single-process inference needs a world of one; this process is rank "
                        f"{dist.get_rank()} of {dist.get_world_size()}")
    return init_distributed(ParallelConfig(backend="gloo", zero="none"))


def single_process_config(cfg: Config) -> Config:
    """The same model and method on one process (no TP/PP/SP, no recompute)."""
    out = copy.deepcopy(cfg)
    out.parallel = ParallelConfig(backend="gloo", zero="none")
    out.train.recompute = False
    return out


def build_model(cfg: Config, vocab_size: int, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> LoadedModel:
    """An (uninitialised) single-process model for ``cfg`` with ``vocab_size`` embedding rows."""
    ctx = world_of_one()
    cfg1 = single_process_config(cfg)
    stage = LlamaStage(cfg1, ctx, vocab_size).to(device=device, dtype=dtype).eval()
    return LoadedModel(cfg1, stage, vocab_size)


def load_logical_state(model: LoadedModel, state: dict[str, torch.Tensor]) -> None:
    """Copy full logical (HF-style) weights into the single-process model."""
    views = dict(logical_parameters(model.stage))
    missing, unexpected = sorted(set(views) - set(state)), sorted(set(state) - set(views))
    if missing or unexpected:
        raise LoadError(f"weights do not match the model: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}")
    with torch.no_grad():
        for name, lp in views.items():
            if tuple(state[name].shape) != tuple(lp.local.shape):
                raise LoadError(f"{name}: shape {tuple(state[name].shape)}, the model expects "
                                f"{tuple(lp.local.shape)}")
            lp.local.copy_(state[name])


# -- Trainer checkpoints --------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (follows ``latest``) or an ``iter_*`` directory -> the iter directory."""
    from megatron_latentcot.training.checkpoint import MANIFEST, latest_checkpoint

    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    found = latest_checkpoint(p) if p.is_dir() else None
    if found is None:
        raise LoadError(f"{p}: neither a checkpoint directory (with {MANIFEST}) nor a run "
                        "directory with a 'latest' pointer")
    return found


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    from megatron_latentcot.training.checkpoint import MANIFEST

    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{ckpt_dir / MANIFEST}: unreadable manifest ({e})") from e
    for key in ("config", "layout", "files"):
        if key not in manifest:
            raise LoadError(f"{ckpt_dir / MANIFEST}: no {key!r} entry")
    return manifest


def _files(ckpt_dir: Path, manifest: dict[str, Any], verify: bool):
    """The checkpoint's distinct rank files (training/reshard.py), checksummed if ``verify``."""
    from megatron_latentcot.training.reshard import RankFiles

    files = RankFiles(ckpt_dir, manifest)
    problems = files.verify(files.ranks) if verify else []
    if problems:
        raise LoadError(problems[0])
    return files


def gather_checkpoint(ckpt_dir: Path, manifest: dict[str, Any],
                      layouts: dict[str, tuple[str, Any]] | None,
                      verify: bool = True) -> dict[str, torch.Tensor]:
    """Full single-process state dict (parameter names of a TP = 1 stage) from every rank file.

    ``layouts`` from :func:`param_layouts` of a TP = 1 model; None is allowed only for TP = 1.
    """
    from megatron_latentcot.training.checkpoint import CheckpointError

    try:
        return _files(ckpt_dir, manifest, verify).gather(layouts)
    except CheckpointError as e:
        raise LoadError(str(e)) from e


def _vocab_rows(files: Any) -> int:
    """Full embedding rows: TP-rank 0's first-stage slice (its DP shards summed) x TP."""
    rows = sum(s["embed_tokens.weight"].shape[0] for r, s in files.model_states().items()
               if files.positions[r].pp == 0 and files.positions[r].tp == 0)
    return rows * files.layout["tp"]


def _load_tokenizer(cfg: Config, fingerprint: str | None, tokenizer_model: str | Path | None,
                    base: Path) -> Tokenizer | None:
    """The tokenizer named by ``tokenizer_model`` or the config (a file, or a directory such as
    GPT-2's vocab/merges pair), checked by fingerprint (``data.tokenizer.find_tokenizer``).

    A relative config path is looked up beside the checkpoint/export (``base``), then in the
    working directory. Returns None when nothing is found (and nothing was asked for).
    """
    from megatron_latentcot.data.tokenizer import TokenizerError, find_tokenizer

    path = tokenizer_model or cfg.data.tokenizer_model
    try:
        tok = find_tokenizer(cfg.data.tokenizer_type, path,
                             () if tokenizer_model else (base,), fingerprint)
    except TokenizerError as e:
        raise LoadError(str(e)) from None
    if tok is None and tokenizer_model:
        raise LoadError(f"{tokenizer_model}: tokenizer file not found")
    return tok


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32,
                          tokenizer_model: str | Path | None = None,
                          verify: bool = True) -> LoadedModel:
    """A Trainer checkpoint (any TP/PP/DP layout) as a single-process model.

    The tokenizer is the file recorded in the config (a relative path is looked up in the run
    directory, then the working directory) or ``tokenizer_model``; its fingerprint must match
    the manifest's. ``verify`` checks every rank file's SHA-256 against the manifest.
    """
    ckpt_dir = resolve_checkpoint(path)
    manifest = read_manifest(ckpt_dir)
    cfg = config_from_saved(manifest["config"], str(ckpt_dir))
    from megatron_latentcot.training.checkpoint import CheckpointError

    try:
        files = _files(ckpt_dir, manifest, verify)
        model = build_model(cfg, _vocab_rows(files), device="cpu", dtype=torch.float32)
        state = files.gather(param_layouts(model.stage))
    except CheckpointError as e:
        raise LoadError(str(e)) from e
    with torch.no_grad():
        params = dict(model.stage.named_parameters())
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise LoadError(f"{ckpt_dir}: checkpoint does not match the model: missing "
                            f"{missing[:5]}, unexpected {unexpected[:5]}")
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise LoadError(f"{name}: gathered shape {tuple(state[name].shape)}, the model "
                                f"expects {tuple(p.shape)}")
            p.copy_(state[name])
    model.stage.to(device=device, dtype=dtype)
    model.tokenizer = _load_tokenizer(cfg, manifest.get("tokenizer"), tokenizer_model,
                                      ckpt_dir.parent)
    model.source = {"kind": "checkpoint", "path": str(ckpt_dir),
                    "iteration": manifest.get("iteration"), "layout": manifest["layout"],
                    "consumed_tokens": manifest.get("consumed_tokens"),
                    "train_flops": manifest.get("train_flops")}
    return model


# -- exported latent models -----------------------------------------------------------------

def load_exported_model(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32,
                        tokenizer_model: str | Path | None = None) -> LoadedModel:
    """A directory written by ``save_latent_export`` (safetensors + ``latent_config.json``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    try:
        meta = json.loads((d / LATENT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{d / LATENT_CONFIG}: unreadable export config ({e})") from e
    tok = meta.get("tokenizer") or {}
    data = {"seq_length": int(meta.get("seq_length", 1)),
            "tokenizer_type": tok.get("type", "sentencepiece"), "tokenizer_model": tok.get("file")}
    sections = {"model": meta["model"], "latent": meta["latent"], "data": data}
    if meta.get("mor") is not None:  # MoR's settings (exports before it have none)
        sections["mor"] = meta["mor"]
    cfg = config_from_saved(sections, str(d))
    model = build_model(cfg, int(meta["vocab_size"]), device="cpu", dtype=torch.float32)
    try:
        weights = load_file(str(d / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise LoadError(f"{d / WEIGHTS}: unreadable weights ({e}); expected the safetensors "
                        "file tools/export_hf.py writes") from e
    load_logical_state(model, weights)
    model.stage.to(device=device, dtype=dtype)
    model.tokenizer = _load_tokenizer(model.cfg, tok.get("fingerprint"), tokenizer_model, d)
    model.source = {"kind": "export", "path": str(d), **{k: meta.get(k) for k in
                                                         ("iteration", "consumed_tokens")}}
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32,
               tokenizer_model: str | Path | None = None) -> LoadedModel:
    """A Trainer checkpoint (run or ``iter_*`` directory) or a latent export directory."""
    p = Path(path)
    if (p / LATENT_CONFIG).is_file():
        return load_exported_model(p, device, dtype, tokenizer_model)
    return load_checkpoint_model(p, device, dtype, tokenizer_model)


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(table)}")
    return table[name]
