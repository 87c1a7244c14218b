"""``python -m qfine …``: the same CLI as the ``qfine`` command (what ``torchrun -m qfine`` runs)."""

import sys

from qfine.cli import main

sys.exit(main())
