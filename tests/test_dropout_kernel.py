"""The Triton kernels of fused LoRA dropout (qfine.fast.dropout_kernel) against the PyTorch reference in
qfine.fast.lora: the same mask bits as ops.keep_mask, and the same products to fp32 rounding (1e-5)
or bf16 rounding. On CUDA; on the CPU only under Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from qfine.fast import lora, ops

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                                                  reason="needs a CUDA GPU (or TRITON_INTERPRET=1 with triton)")]


def _pack(n, r, d, p, dtype, seed=0):
    """A Pack of n adapters (rank r, input d, dropout p) with random A's and the layer's 7 seeds."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n * r, d, generator=g) / d**0.5).to(DEVICE, dtype)
    seeds = torch.randint(0, 2**32, (7,), generator=g, dtype=torch.int64).to(DEVICE)
    blocks = [lora.Block(slice(0, 1), slice(i * r, (i + 1) * r), 1.0, p, 2 + i) for i in range(n)]
    return lora.Pack(a, None, None, seeds, blocks)


def _both(fn, *args):
    """fn(*args) with the kernels, then with the PyTorch reference (inputs cloned for in-place fns)."""
    lora.use_dropout_kernels = True
    got = fn(*[x.clone() if isinstance(x, torch.Tensor) else x for x in args])
    lora.use_dropout_kernels = False
    try:
        ref = fn(*[x.clone() if isinstance(x, torch.Tensor) else x for x in args])
    finally:
        lora.use_dropout_kernels = True
    return got, ref


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_kernel_masks_are_the_reference_masks_bit_for_bit():
    """dx += drop_i'(g_i A_i) with g_i A_i = 1 everywhere gives keep_i / (1 − p): each adapter's mask, exactly."""
    t, d, r, n, p = 130, 200, 16, 3, 0.25
    pack = _pack(n, r, d, p, torch.float32)
    pack.a = torch.zeros(n * r, d, device=DEVICE)
    for i in range(n):
        g = torch.zeros(t, n * r, device=DEVICE)
        g[:, i * r] = 1.0
        pack.a.zero_()
        pack.a[i * r] = 1.0
        dx = lora._add_lora_dx(torch.zeros(t, d, device=DEVICE), g, pack)
        keep = ops.keep_mask(pack.seeds[2 + i].cpu(), t, d, p)
        assert torch.equal(dx.cpu() != 0, keep)
        assert torch.equal(dx.cpu()[keep], torch.full((int(keep.sum()),), 1 / (1 - p)))
        assert abs(float(keep.float().mean()) - (1 - p)) < 0.02


@pytest.mark.parametrize("n,r", [(1, 16), (2, 8), (3, 16)])
def test_kernels_equal_the_reference_in_fp32(n, r):
    """Token and feature counts off the tile sizes, x a view of a wider buffer (the folded layout)."""
    t, d, p = 150, 200, 0.1
    pack = _pack(n, r, d, p, torch.float32, seed=n)
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(t, d + n * r, generator=gen).to(DEVICE)
    x = wide[:, :d]
    g = torch.randn(t, n * r, generator=gen).to(DEVICE)
    got, ref = _both(lora._lora_in, x, pack)
    assert got.shape == ref.shape == (t, n * r) and _rel(got, ref) < 1e-5
    got, ref = _both(lora._lora_da, g, x, pack)
    assert got.shape == ref.shape == (n * r, d) and _rel(got, ref) < 1e-5
    dx = torch.randn(t, d + n * r, generator=gen).to(DEVICE)[:, :d]
    got, ref = _both(lora._add_lora_dx, dx, g, pack)
    assert _rel(got, ref) < 1e-5
    assert _rel(got - dx, ref - dx) < 1e-5  # the LoRA part itself, not only dx


@pytest.mark.skipif(DEVICE == "cpu", reason="Triton 3.6's interpreter multiplies two loaded bf16 tiles wrongly")
def test_kernels_agree_with_the_reference_in_bf16():
    """bf16 inputs: the kernels accumulate in fp32 where the reference rounds the (dy B) A product and
    the dropped gradient to bf16 first, so they agree to bf16 rounding, not bit for bit."""
    t, d, n, r, p = 256, 384, 3, 16, 0.05
    pack = _pack(n, r, d, p, torch.bfloat16, seed=3)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(t, d, generator=gen).to(DEVICE, torch.bfloat16)
    g = torch.randn(t, n * r, generator=gen).to(DEVICE, torch.bfloat16)
    got, ref = _both(lora._lora_in, x, pack)
    assert got.dtype == torch.bfloat16 and _rel(got, ref) < 1e-2
    got, ref = _both(lora._lora_da, g, x, pack)
    assert _rel(got, ref) < 1e-2
    dx = torch.zeros(t, d, device=DEVICE, dtype=torch.bfloat16)
    got, ref = _both(lora._add_lora_dx, dx, g, pack)
    assert got.dtype == torch.bfloat16 and _rel(got, ref) < 1e-2
