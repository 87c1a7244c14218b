"""torch's private symbols that qfine uses, each with why (pinned by tests/test_compat.py)."""

from __future__ import annotations


def set_last_lr(scheduler, lrs: list[float]) -> None:
    """torch ``LRScheduler._last_lr``: what ``get_last_lr()`` returns. torch sets it only inside
    ``step()``; a resumed run whose schedule changed needs it to show the rate it really applies."""
    if not hasattr(scheduler, "_last_lr"):
        raise RuntimeError("torch's LRScheduler no longer keeps _last_lr (qfine.compat.torch.set_last_lr)")
    scheduler._last_lr = list(lrs)
