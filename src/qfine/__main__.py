"""``python -m qfine …``: the same CLI as the ``qfine`` command (what ``torchrun -m qfine`` runs)."""

import sys

from .cli import main

sys.exit(main())
