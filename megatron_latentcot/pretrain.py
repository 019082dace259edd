"""Entry point: ``python -m megatron_latentcot.pretrain --config X.yaml [section.field=value ...]``.

Run it under ``torchrun`` or ``srun`` (one task per GPU) for several processes; alone it is a
world of one. Under ``srun``, ``MASTER_ADDR`` defaults to the first host of the job's node list
and ``MASTER_PORT`` to ``10000 + SLURM_JOB_ID % 50000``; set them to override.

Exit codes (``megatron_latentcot.training.faults``):

- 0 done;
- 1 a failure while training: a failed save (full disk), non-finite losses, a failed or
  timed-out collective (only the last is worth an automatic restart);
- 2 bad input, found before training starts: the config or launch environment, the output
  directory (not writable, another run's), the data (a missing or corrupt ``.idx``, a truncated
  ``.bin``, a dataset of another tokenizer), the tokenizer, or the checkpoint to load
  (truncated, corrupt, another model's). One line per rank names the file and what was
  expected; fix it before retrying;
- 3 preempted by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job with
  ``train.load`` = ``train.save``;
- 4 a hung rank was ended by the watchdog.

For Slurm, e.g. ``#SBATCH --signal=USR1@120`` and
``srun python -m megatron_latentcot.pretrain ... ; [ $? -eq 3 ] && scontrol requeue $SLURM_JOB_ID``.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_latentcot.config import load_config
from megatron_latentcot.training.faults import (
    EXIT_FAILURE,
    EXIT_OK,
    exits_on_input_error,
    input_error_label,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (examples/configs/*.yaml); defaults if omitted")
    p.add_argument("overrides", nargs="*", help="overrides like train.lr=1e-3 model.num_layers=8")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    return p.parse_args(argv)


@exits_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return EXIT_OK
    from megatron_latentcot.parallel import destroy_distributed
    from megatron_latentcot.training.checkpoint import CheckpointError
    from megatron_latentcot.training.faults import (
        CollectiveError,
        TrainingHalted,
        is_collective_failure,
    )
    from megatron_latentcot.training.loop import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)  # bad input (data, tokenizer, checkpoint) raises here: exit 2
        result = trainer.train()
    except (CheckpointError, TrainingHalted, CollectiveError) as e:
        if trainer is None and not isinstance(e, CollectiveError):
            raise  # a checkpoint that cannot be loaded is bad input
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except Exception as e:  # e.g. a rendezvous timeout: a peer never joined
        if not is_collective_failure(e) or input_error_label(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: rank {os.environ.get('RANK', '0')}: distributed setup failed "
              f"({type(e).__name__}: {first}); another rank probably died or never "
              "started, see its log", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    destroy_distributed()
    return int(result.get("exit_code", EXIT_OK))


if __name__ == "__main__":
    sys.exit(main())
