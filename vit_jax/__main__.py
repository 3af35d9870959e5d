"""`python -m vit_jax <command> ...`: see `vit_jax.cli`."""

import sys

from vit_jax import cli

sys.exit(cli.main())
