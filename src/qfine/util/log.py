"""qfine's console lines: ``[qfine] …`` on stdout, from rank 0 of a launched job only unless a line
concerns every rank (then each rank says it, tagged ``[qfine rank N]``).

One function (:func:`say`) instead of ``print`` calls spread over the recipe, so that a multi-GPU job
prints each decision once.
"""

from __future__ import annotations

import sys

from qfine.util import distributed


def say(line: str, every_rank: bool = False) -> None:
    """Print ``[qfine] line`` (rank 0 only, unless ``every_rank``: then each rank, tagged with its number)."""
    rank = distributed.rank()
    if rank != 0 and not every_rank:
        return
    tag = "[qfine]" if rank == 0 else f"[qfine rank {rank}]"
    sys.stdout.write(f"{tag} {line}\n")
    sys.stdout.flush()
