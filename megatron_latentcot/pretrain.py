"""Entry point: ``python -m megatron_latentcot.pretrain --config X.yaml [section.field=value ...]``.

Run it under ``torchrun`` for several processes; alone it is a world of one.
"""

from __future__ import annotations

import argparse
import sys

from megatron_latentcot.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (examples/configs/*.yaml); defaults if omitted")
    p.add_argument("overrides", nargs="*", help="overrides like train.lr=1e-3 model.num_layers=8")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        from megatron_latentcot.parallel import destroy_distributed
        from megatron_latentcot.training.loop import Trainer

        trainer = Trainer(cfg)
        trainer.train()
        destroy_distributed()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
