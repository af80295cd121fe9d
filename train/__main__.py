"""`python -m train`: the same as `tpo-train`."""

import sys

from train.cli import train_main

sys.exit(train_main())
