"""Generate text from a checkpoint with the latent loop per new token (any method).

``python tools/generate.py --help`` lists the options. The command line is
:mod:`megatron_latentcot.cli.generate` (this script only runs its ``main``, from any directory,
without installing the package).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_latentcot.cli.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
