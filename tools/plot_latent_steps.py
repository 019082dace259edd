"""Where the model thinks: every token of a text coloured by the latent steps it took.

``python tools/plot_latent_steps.py --help`` lists the options. The command line is
:mod:`megatron_latentcot.cli.plot_latent_steps` (this script only runs its ``main``, from any directory,
without installing the package).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_latentcot.cli.plot_latent_steps import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
