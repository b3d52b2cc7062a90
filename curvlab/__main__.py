"""``python -m curvlab``: the command line (also what ``torchrun -m curvlab`` starts)."""

import sys

from curvlab.commands import main

sys.exit(main())
