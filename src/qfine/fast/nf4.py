"""Dequantize a frozen base weight for one GEMM.

``stacked`` is the one entry point the fused functions use; :func:`dequantize` picks the GEMM-side
dequantizer of the layer's base-weight kind (:data:`qfine.quant.KINDS`). NF4 weights on CUDA go
through the one-launch Triton kernel of :mod:`.nf4_kernel` (double quantization included); FP4, CPU,
or ``QFINE_TRITON_NF4=0`` through bitsandbytes' own ``dequantize_4bit``, which is also the reference
the kernel is tested against. Group-wise INT4 layers (:class:`qfine.quant.int4.Int4Linear`) go through
:mod:`.int4_kernel` on CUDA and :func:`qfine.quant.int4.dequantize_groups` elsewhere. A kind with no
dequantizer here goes through the registry's exact one.

A group of weights can instead be kept dequantized (:func:`keep`, chosen per layer by
:mod:`.resident`): ``stacked`` then hands out the kept buffer, and no dequantize runs for that group.
"""

from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass

import bitsandbytes as bnb
import torch

from qfine.quant import DENSE, KINDS, bnb4, int4
from qfine.quant.bnb4 import ensure_not_repacked


def _triton_nf4(w: torch.Tensor, state, dtype: torch.dtype) -> bool:
    if not (w.is_cuda and state.quant_type == "nf4" and state.dtype == dtype and state.blocksize % 2 == 0):
        return False
    if os.environ.get("QFINE_TRITON_NF4", "1") == "0" or state.shape[0] * state.shape[1] % 2:
        return False
    tensors = [state.code, state.absmax] + ([state.offset, state.state2.code, state.state2.absmax]
                                            if state.nested else [])
    return all(isinstance(t, torch.Tensor) and t.device == w.device for t in tensors)


def device_of(linear: torch.nn.Module) -> torch.device:
    """Where a frozen linear's weight lives, without materialising a computed weight (INT4's)."""
    return next(itertools.chain(linear.parameters(recurse=False), linear.buffers(recurse=False))).device


def _int4(linear, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if linear.codes.is_cuda and os.environ.get("QFINE_TRITON_NF4", "1") != "0" and (out is None or out.stride(1) == 1):
        from qfine.fast.int4_kernel import dequantize_int4  # Triton: CUDA only

        return dequantize_int4(linear.codes, linear.scales, linear.mins, dtype, out=out)
    return _into(linear.dequantize(), dtype, out)


def _bnb4(linear, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    w = linear.weight
    state = w.quant_state
    ensure_not_repacked(w)
    if _triton_nf4(w, state, dtype) and (out is None or (out.dtype == dtype and out.stride(1) == 1)):
        from qfine.fast.nf4_kernel import dequantize_nf4  # Triton: CUDA only

        return dequantize_nf4(w.data, state, out=out)
    if out is not None and out.dtype == state.dtype and w.is_cuda and out.is_contiguous():  # no CPU kernel for .out
        return bnb.functional.dequantize_4bit(w.data, state, out=out)
    return _into(bnb.functional.dequantize_4bit(w.data, state), dtype, out)


def _dense(linear, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    return _into(linear.weight, dtype, out)


def _into(full: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is not None:
        return out.copy_(full)
    return full if full.dtype == dtype else full.to(dtype)


# the GEMM-side dequantizer of each base-weight kind that has one; any other kind goes through the
# registry's exact fp32 dequantization (correct, one extra copy)
_FAST = {bnb4.KIND.name: _bnb4, int4.KIND.name: _int4, DENSE.name: _dense}


def dequantize(linear: torch.nn.Module, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) weight of a frozen base linear (:data:`qfine.quant.KINDS`) in ``dtype``.

    A 16-bit weight already in ``dtype`` is returned as is (no copy) unless ``out`` is given; a 4-bit
    one is dequantized into a new buffer, or into ``out``: an (out, in) tensor with contiguous rows
    such as a row block of a stacked weight or the leading columns of a wider one. The caller frees
    the buffer right after its GEMM.
    """
    kind = KINDS.of(linear)
    fast = _FAST.get(kind.name) if kind is not None else None
    if fast is not None:
        return fast(linear, dtype, out)
    return _into(KINDS.dequantize(linear), dtype, out)


@dataclass
class _Kept:
    """A group's weight kept dequantized: the linears it was built from (weakly), its layout, the buffer."""

    group: tuple          # weakref.ref to each linear, in stacking order
    dtype: torch.dtype
    extra_cols: int
    weight: torch.Tensor  # (Σ out, in + extra_cols)

    def serves(self, linears, dtype, extra_cols) -> bool:
        return (dtype == self.dtype and extra_cols == self.extra_cols and len(linears) == len(self.group)
                and all(ref() is lin for ref, lin in zip(self.group, linears)))


# first linear of a kept group → its _Kept; weak keys, so a dropped model takes its buffers along
_KEPT: "weakref.WeakKeyDictionary[torch.nn.Module, _Kept]" = weakref.WeakKeyDictionary()


def _plain(linear, dtype: torch.dtype) -> bool:
    """A 16-bit weight already in ``dtype``: :func:`stacked` hands it out as is."""
    return KINDS.of(linear) is DENSE and linear.weight.dtype == dtype


def kept_bytes(linears, dtype: torch.dtype, extra_cols: int = 0) -> int:
    """What :func:`keep` would hold for the group, without building it: 0 for a lone 16-bit weight
    already in ``dtype`` (``stacked`` hands out the weight itself)."""
    if len(linears) == 1 and not extra_cols and _plain(linears[0], dtype):
        return 0
    return sum(lin.out_features for lin in linears) * (linears[0].in_features + extra_cols) * dtype.itemsize


def keep(linears, dtype: torch.dtype, extra_cols: int = 0) -> int:
    """Dequantize the group once and have :func:`stacked` return that buffer from now on (frozen
    weights only: nothing refreshes it). Returns the bytes it holds; 0, keeping nothing, for a lone
    16-bit weight already in ``dtype`` (``stacked`` returns the weight itself then)."""
    if len(linears) == 1 and not extra_cols and _plain(linears[0], dtype):
        return 0
    w = stacked(linears, dtype, extra_cols)
    _KEPT[linears[0]] = _Kept(tuple(weakref.ref(lin) for lin in linears), dtype, extra_cols, w)
    return w.numel() * w.element_size()


def release(linears) -> None:
    """Forget the kept buffer of the group starting with ``linears[0]``, if any."""
    _KEPT.pop(linears[0], None)


def stacked(linears, dtype: torch.dtype, extra_cols: int = 0) -> torch.Tensor:
    """Weights of linears sharing one input, stacked along the output dim: (Σ out, in) in ``dtype``,
    or (Σ out, in + extra_cols) with the extra columns left for the caller to fill.

    One GEMM against the stack replaces one per projection (q, k, v → one; gate, up → one). A kept
    group (:func:`keep`) returns its kept buffer: the caller may overwrite the extra columns, never
    the weights.
    """
    kept = _KEPT.get(linears[0]) if _KEPT else None
    if kept is not None and kept.serves(linears, dtype, extra_cols):
        return kept.weight
    if len(linears) == 1 and not extra_cols:
        return dequantize(linears[0], dtype)
    rows = [lin.out_features for lin in linears]
    cols = linears[0].in_features
    w = torch.empty(sum(rows), cols + extra_cols, dtype=dtype, device=device_of(linears[0]))
    start = 0
    for lin, n in zip(linears, rows):
        dequantize(lin, dtype, out=w[start:start + n, :cols])
        start += n
    return w
