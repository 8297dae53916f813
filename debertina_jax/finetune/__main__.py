"""`python -m debertina_jax.finetune`: see cli.py."""

import sys

from debertina_jax.finetune.cli import main

sys.exit(main())
