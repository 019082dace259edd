"""Small-scale reproduction study (issue #11): every method on the default corpus, one command.

``python tools/reproduce_study.py --help`` lists the options. The command line is
:mod:`megatron_latentcot.cli.reproduce_study` (this script only runs its ``main``, from any directory,
without installing the package).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_latentcot.cli.reproduce_study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
