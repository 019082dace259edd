"""Export a checkpoint (any TP/PP/DP layout) to a single-process format.

``python tools/export_hf.py --help`` lists the options. The command line is
:mod:`megatron_latentcot.cli.export_hf` (this script only runs its ``main``, from any directory,
without installing the package).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_latentcot.cli.export_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
