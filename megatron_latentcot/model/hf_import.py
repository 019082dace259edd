"""Start from a pretrained transformers Llama: its config and weights in this project's terms.

A transformers checkpoint directory (``config.json`` + ``model.safetensors`` or shards listed in
``model.safetensors.index.json``; fp32, bf16 or fp16) maps onto our model exactly: the same
logical weights (``model/export.py`` names them for both directions), RMSNorm eps, RoPE theta and
linear / Llama-3 RoPE scaling, GQA, tied or untied embeddings. Anything else a Llama config can
ask for that our forward does not compute (attention or MLP biases, another activation, another
RoPE type, a head_dim other than hidden / heads) is refused by name: never silently mis-loaded.

:func:`import_hf` writes it as a run directory: a world-of-one checkpoint (``iter_0000000``,
which ``train.init_from`` re-slices for any TP/PP/DP layout, and ``tools/export_hf.py`` /
``inference.loading`` read), the tokenizer found beside it, and ``config.yaml`` whose ``model:``
section matches. The vocabulary is padded to ``model.make_vocab_size_divisible_by`` x TP with
zero rows that are never predicted (``model.predicted_vocab_size``), so losses are the source
model's. The embedding multiplier is 1.0: the source's embeddings were trained at that scale.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_latentcot.config import ROPE_SCALING_FIELDS, Config, ModelConfig, config_from_dict
from megatron_latentcot.model.export import HF_ROPE_KEYS, VOCAB_ROWS, logical_name
from megatron_latentcot.training.checkpoint import CheckpointError

HF_CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
RUN_CONFIG = "config.yaml"
# Tokenizer files looked for beside config.json, in this order, with their tokenizer_type.
TOKENIZER_FILES = (("tokenizer.json", "huggingface"), ("tokenizer.model", "sentencepiece"))
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class HFImportError(CheckpointError):
    """A transformers checkpoint cannot be imported; the message names the file and why."""


def is_hf_checkpoint(path: str | Path) -> bool:
    """A transformers model directory (``config.json``), not one of our run directories."""
    return (Path(path) / HF_CONFIG).is_file()


# -- config.json -> model: section -----------------------------------------------------------

def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / HF_CONFIG
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFImportError(f"{path}: not found (expected a transformers model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFImportError(f"{path}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise HFImportError(f"{path}: not a JSON object")
    return raw


def _rope(raw: dict[str, Any], where: Path) -> dict[str, Any]:
    """RoPE fields from either transformers layout: v4 (``rope_theta`` + ``rope_scaling``) or
    v5 (``rope_parameters`` holding both)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", raw.get("rope_theta",
                                                                                 10000.0)))}
    if scaling.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFImportError(f"{where}: partial_rotary_factor != 1 is not supported")
    if kind in ("default", None):
        return dict(out, rope_scaling=None)
    if kind not in ROPE_SCALING_FIELDS:
        raise HFImportError(f"{where}: RoPE type {kind!r} is not supported (supported: default, "
                            "linear, llama3)")
    out["rope_scaling"] = kind
    for field in ROPE_SCALING_FIELDS[kind]:
        key = HF_ROPE_KEYS[field]
        if key not in scaling:
            raise HFImportError(f"{where}: rope scaling {kind!r} without {key!r}")
        out[field] = scaling[key]
    return out


def model_fields_from_hf(raw: dict[str, Any], where: Path) -> dict[str, Any]:
    """The ``model:`` config section for a transformers Llama config (``raw``, from ``where``)."""
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise HFImportError(f"{where}: not a Llama checkpoint (model_type "
                            f"{raw.get('model_type')!r}, architectures {archs}); only "
                            "LlamaForCausalLM is imported")
    refusals = {"attention_bias": "attention biases", "mlp_bias": "MLP biases"}
    for key, what in refusals.items():
        if raw.get(key):
            raise HFImportError(f"{where}: {key}=true ({what}) is not supported by this "
                                "project's Llama")
    if raw.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"{where}: hidden_act={raw['hidden_act']!r} is not supported "
                            "(SwiGLU with silu only)")
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        fields = {"hidden_size": hidden, "num_layers": int(raw["num_hidden_layers"]),
                  "num_attention_heads": heads,
                  "num_query_groups": int(raw.get("num_key_value_heads") or heads),
                  "ffn_hidden_size": int(raw["intermediate_size"]),
                  "predicted_vocab_size": int(raw["vocab_size"])}
    except KeyError as e:
        raise HFImportError(f"{where}: no {e.args[0]!r} entry") from None
    if raw.get("head_dim") not in (None, hidden // heads):
        raise HFImportError(f"{where}: head_dim={raw['head_dim']} differs from hidden_size / "
                            f"num_attention_heads ({hidden // heads}): not supported")
    return dict(fields, vocab_size=None,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                embedding_multiplier=1.0, init_std=None, **_rope(raw, where))


# -- safetensors -> logical weights ----------------------------------------------------------

def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise HFImportError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise HFImportError(f"{path}: unreadable safetensors file ({e})") from None


def read_hf_weights(model_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of the checkpoint (transformers names) and the file each came from."""
    d = Path(model_dir)
    index = d / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFImportError(f"{index}: unreadable index ({e!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise HFImportError(f"{d / missing[0]}: missing (listed in {SAFETENSORS_INDEX}"
                                f"{f' with {len(missing) - 1} more' if len(missing) > 1 else ''})")
    elif (d / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    else:
        raise HFImportError(f"{d}: neither {SAFETENSORS} nor {SAFETENSORS_INDEX} (only "
                            "safetensors are read; re-save with save_pretrained)")
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        for name, t in _load_safetensors(d / f).items():
            if t.dtype not in WEIGHT_DTYPES:
                raise HFImportError(f"{d / f}: tensor {name} is {t.dtype}; expected float32, "
                                    "bfloat16 or float16")
            tensors[name], origin[name] = t, d / f
    return tensors, origin


def logical_weights(hf: dict[str, torch.Tensor], origin: dict[str, Path],
                    m: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers names -> our logical names, fp32. RoPE buffers some checkpoints store are
    dropped; a tied model's stored LM head must equal its embedding."""
    out = {logical_name(k): v.float() for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    if m.tie_embeddings and "lm_head.weight" in out:
        head = out.pop("lm_head.weight")
        if not torch.equal(head, out.get("embed_tokens.weight", head)):
            raise HFImportError(f"{origin['lm_head.weight']}: tie_word_embeddings=true but "
                                "lm_head.weight differs from model.embed_tokens.weight")
    return out


def pad_vocab_rows(state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Vocabulary weights padded with zero rows to ``rows`` (those rows are never predicted)."""
    out = dict(state)
    for name in VOCAB_ROWS:
        t = out.get(name)
        if t is not None and t.shape[0] < rows:
            out[name] = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return out


def find_tokenizer(model_dir: str | Path) -> tuple[str, Path] | None:
    """(tokenizer_type, file) of the tokenizer beside the checkpoint, or None."""
    for name, kind in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            return kind, Path(model_dir) / name
    return None


# -- the run directory --------------------------------------------------------------------------

def imported_config(model_dir: str | Path, base: dict[str, Any], tokenizer: tuple[str, Path],
                    run_dir: Path) -> Config:
    """``base`` (a config as a dict: --config and overrides) with the checkpoint's ``model:``
    section, its tokenizer, ``train.init_from`` = ``run_dir`` and no ``train.save``."""
    where = Path(model_dir) / HF_CONFIG
    fields = model_fields_from_hf(read_hf_config(model_dir), where)
    raw = copy.deepcopy(base)
    model = raw.setdefault("model", {})
    kept = {"make_vocab_size_divisible_by"}  # padding is the run's choice
    for key in [k for k in model if k not in kept]:
        del model[key]
    model.update(fields)
    data, train = raw.setdefault("data", {}), raw.setdefault("train", {})
    data["tokenizer_type"], data["tokenizer_model"] = tokenizer[0], str(run_dir / tokenizer[1].name)
    # Where the continued run saves is the caller's choice (train.save=...), never another run's.
    train["init_from"], train["load"], train["save"] = str(run_dir), None, None
    return config_from_dict(raw, str(where))


def check_data_tokenizer(cfg: Config, tok: Any) -> None:
    """Every dataset prefix of ``cfg`` was built with ``tok`` (its ``.meta.json`` says so);
    one line naming the metadata file otherwise. Prefixes without metadata are checked again,
    by their ids, when training starts."""
    from megatron_latentcot.config import parse_blend
    from megatron_latentcot.data.indexed import check_tokenizer

    prefixes = parse_blend(cfg.data.data_path)[0] if cfg.data.data_path else []
    for prefix in [*prefixes, cfg.data.valid_path, cfg.data.heldout_path]:
        if prefix and Path(f"{prefix}.idx").is_file():
            check_tokenizer(prefix, tok)


def import_hf(model_dir: str | Path, run_dir: str | Path,
              base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model_dir`` (transformers Llama) as a run directory; returns a summary.

    ``base``: a config as a dict (sections of --config and overrides) giving everything but the
    ``model:`` section: method, data, parallel layout, training settings.
    """
    from megatron_latentcot.data.tokenizer import build_tokenizer
    from megatron_latentcot.inference.loading import (
        LoadError,
        build_model,
        load_logical_state,
        world_of_one,
    )
    from megatron_latentcot.training import checkpoint as ckpt
    from megatron_latentcot.vocab import padded_vocab_size

    src, out = Path(model_dir), Path(run_dir)
    if out.exists() and any(out.iterdir()):
        raise HFImportError(f"{out}: exists and is not empty; choose a new --output")
    found = find_tokenizer(src)
    if found is None:
        raise HFImportError(f"{src}: no {' or '.join(n for n, _ in TOKENIZER_FILES)} beside "
                            f"{HF_CONFIG}: the run needs the model's tokenizer")
    cfg = imported_config(src, base or {}, found, out.resolve())
    tok = build_tokenizer(found[0], found[1])
    m = cfg.model
    if tok.vocab_size > m.predicted_vocab_size:
        raise HFImportError(f"{found[1]}: {tok.vocab_size} tokens, more than the model's "
                            f"vocab_size ({m.predicted_vocab_size}, {src / HF_CONFIG})")
    check_data_tokenizer(cfg, tok)
    hf, origin = read_hf_weights(src)
    state = logical_weights(hf, origin, m)
    rows = padded_vocab_size(m, tok.vocab_size, 1)
    model = build_model(cfg, rows)
    try:
        load_logical_state(model, pad_vocab_rows(state, rows))
    except LoadError as e:  # name the file of the offending tensor when there is one
        files = sorted({str(origin[k]) for k in hf if logical_name(k) in str(e)}) or [str(src)]
        raise HFImportError(f"{files[0]}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found[1], out / found[1].name)
    from megatron_latentcot.training.loop import TrainState

    state0 = dataclasses.asdict(TrainState())
    manifest = {"config": cfg.to_dict(), "tokenizer": tok.fingerprint, "vocab_size": rows,
                "consumed_tokens": 0, "train_flops": 0.0,
                "imported_from": {"path": str(src.resolve()), "dtypes": sorted(
                    {str(t.dtype).removeprefix("torch.") for t in hf.values()})}}
    path = ckpt.save_checkpoint(out, 0, {"model": model.stage.state_dict(), "state": state0},
                                manifest, world_of_one(), keep_last=1)
    (out / RUN_CONFIG).write_text(cfg.to_yaml())
    return {"checkpoint": str(path), "config": str(out / RUN_CONFIG), "rows": rows,
            "vocab": m.predicted_vocab_size, "tokenizer": str(out / found[1].name),
            "tensors": len(hf), "model": dataclasses.asdict(m)}

