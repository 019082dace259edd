"""Fetch and convert the default corpus (State of the Union train/valid, Moby Dick held out).

``python tools/prepare_corpus.py --help`` lists the options. The command line is
:mod:`megatron_latentcot.cli.prepare_corpus` (this script only runs its ``main``, from any directory,
without installing the package).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_latentcot.cli.prepare_corpus import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
