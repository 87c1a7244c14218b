"""Comparing tensors: the one relative-difference measure every report and test uses."""

from __future__ import annotations

import torch


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over all elements, in fp64 on the CPU (the two may live on different devices)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm())
