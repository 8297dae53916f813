"""Export a pretraining run to HF PyTorch: `python convert_to_pt.py --workdir W --output O`.

A thin wrapper kept at the top of the repository; the CLI is `debertina_jax.cli.export` (also
installed as the `debertina-export` command).
"""

import sys

from debertina_jax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
