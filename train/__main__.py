"""`python -m tpo_jax.train`: the same as `tpo-train`."""

import sys

from tpo_jax.train.cli import train_main

sys.exit(train_main())
