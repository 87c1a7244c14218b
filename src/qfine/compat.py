"""Every private symbol of another library that qfine touches, in one place.

Each entry says what it reaches and why no public API serves; ``tests/test_compat.py`` pins each one,
so an upgrade that renames or removes it fails there, by name, instead of deep inside a run.
"""

from __future__ import annotations


def set_last_lr(scheduler, lrs: list[float]) -> None:
    """torch ``LRScheduler._last_lr``: what ``get_last_lr()`` returns. torch sets it only inside
    ``step()``; a resumed run whose schedule changed needs it to show the rate it really applies."""
    if not hasattr(scheduler, "_last_lr"):
        raise RuntimeError("torch's LRScheduler no longer keeps _last_lr (qfine.compat.set_last_lr)")
    scheduler._last_lr = list(lrs)
