"""Import a transformers Llama checkpoint as a run directory to continue pretraining from.

Reads MODEL_DIR (config.json + model.safetensors or sharded safetensors; fp32/bf16/fp16) and
its tokenizer (tokenizer.json or tokenizer.model), and writes OUTPUT: a checkpoint that loads at
any TP/PP/DP layout, the tokenizer, and config.yaml (the checkpoint's model section, the rest
from --config and the overrides, train.init_from = OUTPUT). Then, with any method:

    python tools/import_hf.py hf_model --output runs/tiny_imported --config examples/configs/tiny.yaml
    python -m megatron_latentcot.pretrain --config runs/tiny_imported/config.yaml \\
        latent.method=adaptive train.save=runs/tiny_imported_adaptive
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from megatron_latentcot.training.faults import exits_on_input_error


def options_first(argv: list[str]) -> list[str]:
    """``MODEL --output RUN a.b=c`` -> ``--output RUN MODEL a.b=c``: argparse cannot give
    positionals that follow an option to a ``nargs='*'`` positional (every option here takes
    one value)."""
    options, positionals, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and arg not in ("-h", "--help") and "=" not in arg:
            options += argv[i:i + 2]
            i += 2
            continue
        (options if arg.startswith("-") else positionals).append(arg)
        i += 1
    return options + positionals


@exits_on_input_error  # a non-Llama config, a missing shard, a shape mismatch: one line, exit 2
def main(argv: list[str] | None = None) -> int:

    from megatron_latentcot.config import ConfigError, apply_overrides

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="transformers LlamaForCausalLM directory")
    p.add_argument("--output", "-o", required=True, help="run directory to write (new or empty)")
    p.add_argument("--config", default=None,
                   help="YAML config for everything but the model section (data, method, ...)")
    p.add_argument("overrides", nargs="*", help="overrides like parallel.tensor_model_parallel_size=2")
    args = p.parse_args(options_first(sys.argv[1:] if argv is None else argv))
    base = {}
    if args.config:
        try:
            base = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{args.config}: cannot read config ({e})") from None
    from megatron_latentcot.model.hf_import import import_hf

    out = import_hf(args.model_dir, args.output, apply_overrides(base, args.overrides))
    print(f"imported {args.model_dir} ({out['tensors']} tensors, vocabulary {out['vocab']} "
          f"padded to {out['rows']} rows) -> {out['checkpoint']}; tokenizer {out['tokenizer']}\n"
          f"continue pretraining it: python -m megatron_latentcot.pretrain --config "
          f"{out['config']} latent.method=adaptive train.save=RUN_DIR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
