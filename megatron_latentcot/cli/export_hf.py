"""Export a checkpoint (any TP/PP/DP layout) to a single-process format.

- ``hf`` (vanilla models): HF transformers ``LlamaForCausalLM`` (``model.safetensors`` +
  ``config.json``); the embedding multiplier is folded into the (untied) embeddings.
- ``latent`` (every method): logical weights (``model.safetensors``) + ``latent_config.json``,
  loadable by ``megatron_latentcot.inference.loading.load_model`` without the training stack
  (no checkpoint manifest, optimizer or distributed launch).
- ``auto``: ``hf`` when the model is a plain Llama (vanilla, or any method with max_steps 1),
  else ``latent``.

The tokenizer is written beside the weights as transformers keeps it (``tokenizer.model``,
``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt`` + ``tokenizer.json``).

    python tools/export_hf.py runs/tiny --output hf_model
    python tools/export_hf.py runs/tiny_adaptive --output runs/tiny_adaptive_export --format latent
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megatron_latentcot.inference.loading import LoadedModel, load_model, parse_dtype
from megatron_latentcot.training.faults import exits_on_input_error


def is_plain_llama(model: LoadedModel) -> bool:
    lat = model.cfg.latent
    # MoR's shared block and routers are not a Llama whatever the number of recursions
    return lat.method == "vanilla" or (lat.max_steps == 1 and lat.method != "mor")


def _copy_tokenizer(model: LoadedModel, out: Path) -> dict | None:
    """The model's tokenizer written beside the weights (``Tokenizer.export``: HF's layout, a
    GPT-2 vocab/merges pair included); its record for ``latent_config.json``."""
    if model.tokenizer is None:
        return None
    return model.tokenizer.export(out, model_max_length=model.cfg.model.max_position_embeddings)


def export(model: LoadedModel, out_dir: str | Path, fmt: str = "auto",
           dtype: torch.dtype | None = None) -> str:
    """Write ``model`` to ``out_dir`` in ``fmt``; returns the format written."""
    import dataclasses

    from megatron_latentcot.model.export import (
        logical_state_dict,
        save_hf_llama,
        save_latent_export,
    )

    if fmt == "auto":
        fmt = "hf" if is_plain_llama(model) else "latent"
    if fmt == "hf" and not is_plain_llama(model):
        raise ValueError(f"latent.method={model.method!r} with max_steps="
                         f"{model.cfg.latent.max_steps} is not a plain Llama: HF's LlamaForCausalLM "
                         "would drop its latent steps; export with --format latent")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in logical_state_dict(model.stage).items()}
    tok = _copy_tokenizer(model, out)
    if fmt == "hf":
        save_hf_llama(state, model.cfg.model, model.vocab_size, out,
                      model.stage.embedding_multiplier,
                      eod=tok["eod"] if tok else None, dtype=dtype)
    elif fmt == "latent":
        save_latent_export(state, dataclasses.asdict(model.cfg.model),
                           dataclasses.asdict(model.cfg.latent), model.vocab_size, out,
                           seq_length=model.cfg.data.seq_length, tokenizer=tok,
                           extra={"source": model.source,
                                  "mor": dataclasses.asdict(model.cfg.mor)}, dtype=dtype)
    else:
        raise ValueError(f"--format: expected auto, hf or latent, got {fmt!r}")
    return fmt


@exits_on_input_error  # a missing run directory, a truncated checkpoint: one line, exit 2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run directory (follows 'latest') or iter_* directory")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", "-o", help="directory to write")
    out.add_argument("output_dir", nargs="?", metavar="OUTPUT",
                     help="the same, as the second positional argument (the older form)")
    p.add_argument("--format", default="auto", choices=("auto", "hf", "latent"))
    p.add_argument("--dtype", default=None, help="weights dtype (default: float32)")
    p.add_argument("--tokenizer-model", default=None, help="override the config's tokenizer path")
    args = p.parse_args(argv)
    args.output = args.output or args.output_dir
    model = load_model(args.checkpoint, tokenizer_model=args.tokenizer_model)
    fmt = export(model, args.output, args.format,
                 parse_dtype(args.dtype) if args.dtype else None)
    print(f"exported {model.method} model ({fmt}) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
