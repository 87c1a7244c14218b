"""The table of base-weight kinds: one :class:`BaseWeight` per way a frozen linear can be stored.

Every question about a frozen base weight goes through here: which kind a loaded layer is (first
match wins, as peft's ``dispatch_*`` functions), its exact fp32 dequantization (the merge and the
references of the fused kernels), whether the fused GPU layers take it, which tensors weight
streaming moves to host memory, and what it costs in memory (``qfine plan``). Adding a kind is one
module defining its :class:`BaseWeight` and its entry in :data:`KINDS` (``qfine/quant/__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qfine.util.errors import QfineError


@dataclass(frozen=True)
class Settings:
    """How a model's config asks its linears to be stored (the ``model.*`` fields that matter here)."""

    double_quant: bool = True
    group_size: int = 32
    dtype_bytes: int = 2  # of the compute dtype: what a 16-bit ("none") weight takes per element


@dataclass(frozen=True)
class BaseWeight:
    """One kind of frozen base weight.

    ``config_names``: the ``model.quantization`` values that store linears this way. ``matches(module)``:
    whether a loaded module is this kind. ``dequantize(module)``: its (out, in) weight in fp32, exactly
    as the layer computes with it. ``stored_bytes(out, in, settings)``: bytes of one such linear;
    ``host_tensors(out, in, settings)``: the bytes of each tensor of it that streams (the plan rounds
    each up as the pinned-memory cache does).
    ``streamed(module)``: the ``(owner, attr, tensor)`` a weight stream moves to host memory (the large
    tensors whose storage can be swapped without touching the module). ``fused``: the fused GPU layers
    dequantize it per GEMM. ``host_sync``: its matmul reads values back to the host (no CUDA graph).
    """

    name: str
    config_names: tuple[str, ...]
    matches: Callable[[torch.nn.Module], bool]
    dequantize: Callable[[torch.nn.Module], torch.Tensor]
    stored_bytes: Callable[[int, int, Settings], float]
    host_tensors: Callable[[int, int, Settings], tuple[int, ...]] | None = None  # None: one tensor, stored_bytes
    streamed: Callable[[torch.nn.Module], list[tuple[object, str, torch.Tensor]]] = field(default=lambda m: [])
    fused: bool = False
    host_sync: bool = False

    def host_tensor_bytes(self, out: int, inp: int, s: Settings) -> tuple[int, ...]:
        """The bytes of each streamed tensor of one (out, in) linear of this kind."""
        if self.host_tensors is not None:
            return self.host_tensors(out, inp, s)
        return (int(self.stored_bytes(out, inp, s)),)


def dense_tensors(module: torch.nn.Module) -> list[tuple[object, str, torch.Tensor]]:
    """A layer's own frozen parameters, as ``(parameter, "data", tensor)``."""
    return [(p, "data", p.data) for p in module.parameters(recurse=False) if not p.requires_grad]


DENSE = BaseWeight(
    name="16-bit", config_names=("none",),
    matches=lambda m: isinstance(m, torch.nn.Linear),
    dequantize=lambda m: m.weight.detach().float(),
    stored_bytes=lambda out, inp, s: out * inp * s.dtype_bytes,
    streamed=dense_tensors, fused=True)


class Registry:
    """Kinds in dispatch order (the plain ``nn.Linear`` last: quantized layers subclass it)."""

    def __init__(self, kinds: list[BaseWeight]):
        self.kinds = kinds

    def of(self, module: torch.nn.Module) -> BaseWeight | None:
        """The kind of a loaded frozen layer, or None when it is not a base linear qfine knows."""
        return next((k for k in self.kinds if k.matches(module)), None)

    def named(self, quantization: str) -> BaseWeight:
        """The kind that stores linears for ``model.quantization`` (adaptive: its NF4 majority)."""
        for k in self.kinds:
            if quantization in k.config_names:
                return k
        known = ", ".join(n for k in self.kinds for n in k.config_names)
        raise QfineError(f"model.quantization must be one of {known}, not {quantization!r}")

    def dequantize(self, module: torch.nn.Module) -> torch.Tensor:
        """Exact fp32 (out, in) weight of any base linear (16-bit ones included)."""
        kind = self.of(module)
        if kind is None:
            raise QfineError(f"{type(module).__name__} is not a base linear layer qfine can read")
        return kind.dequantize(module)

    def is_quantized(self, module: torch.nn.Module) -> bool:
        kind = self.of(module)
        return kind is not None and kind is not DENSE

    def is_base_linear(self, module: torch.nn.Module) -> bool:
        return self.of(module) is not None
