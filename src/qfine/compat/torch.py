"""torch's private symbols that qfine uses, each with why (pinned by tests/test_compat.py)."""

from __future__ import annotations

import torch


def set_last_lr(scheduler, lrs: list[float]) -> None:
    """torch ``LRScheduler._last_lr``: what ``get_last_lr()`` returns. torch sets it only inside
    ``step()``; a resumed run whose schedule changed needs it to show the rate it really applies."""
    if not hasattr(scheduler, "_last_lr"):
        raise RuntimeError("torch's LRScheduler no longer keeps _last_lr (qfine.compat.torch.set_last_lr)")
    scheduler._last_lr = list(lrs)


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``torch._foreach_norm``: the L2 norm of each tensor in one launch (``torch.linalg.vector_norm``
    per tensor would be a launch each, hundreds a step for the LoRA gradients)."""
    return torch._foreach_norm(tensors)


def foreach_zero_(tensors: list[torch.Tensor]) -> None:
    """``torch._foreach_zero_``: zero many tensors in one launch (used on gradients inside CUDA graphs)."""
    torch._foreach_zero_(tensors)


def persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's own buffers that its state dict saves (``_non_persistent_buffers_set`` holds the rest;
    ``state_dict(keep_vars=True)`` would walk the whole subtree for each module)."""
    return [(name, b) for name, b in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set]


def is_dropout(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of torch's dropout layers (their common base, ``_DropoutNd``, is private)."""
    return isinstance(module, torch.nn.modules.dropout._DropoutNd)


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """``torch._dynamo.maybe_mark_dynamic``: compile once for every size of ``dim`` instead of
    recompiling per batch shape (public only as a private module's function)."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def shutdown_workers(loader) -> None:
    """Stop a DataLoader's worker processes and pin-memory thread now (its iterator's
    ``_shutdown_workers``, which torch otherwise calls when the iterator is garbage collected).

    With persistent workers the iterator outlives the loop that used it; left to the garbage collector
    after an interrupted epoch, the teardown can run at any later point of the process (a sweep's next
    trial) and was seen to stall there on a GPU."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    if iterator is not None:
        loader._iterator = None
