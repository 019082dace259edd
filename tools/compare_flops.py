"""Quality against compute: compare training runs by FLOPs, or tabulate analytic FLOPs per method.

``python tools/compare_flops.py --help`` lists the options. The command line is
:mod:`megatron_latentcot.cli.compare_flops` (this script only runs its ``main``, from any directory,
without installing the package).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_latentcot.cli.compare_flops import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
