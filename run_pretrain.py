"""Pretrain a DeBERTa-v3 discriminator: `python run_pretrain.py --config C --workdir W [k=v ...]`.

A thin wrapper kept at the top of the repository; the CLI is `debertina_jax.cli.pretrain` (also
installed as the `debertina-pretrain` command).
"""

import sys

from debertina_jax.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
