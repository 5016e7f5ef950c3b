"""``python -m experiments.workloads``: see :mod:`experiments.workloads.cli`."""

import sys

from .cli import main

sys.exit(main())
