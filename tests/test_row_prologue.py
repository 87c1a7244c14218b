""":mod:`qfine.fast.row_prologue`: a decode step's LoRA down-products in one launch with the norm or gated
activation that makes their input, against the modules' own computation (Triton's CPU interpreter in fp32;
the GPU in bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qfine.generation import engine

INTERPRETED = pytest.mark.skipif(not engine._INTERPRETED,
                                 reason="runs Triton kernels on the CPU: TRITON_INTERPRET=1 with triton")


def _norm(h, w, eps):
    """Llama's RMSNorm module: fp32 statistics, cast back before the weight multiplies."""
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _gated(g, u, act):
    """act_fn(gate) * up as the eager module rounds it (after the activation and after the product)."""
    a = F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh" if act == "gelu_tanh" else "none")
    return a * u


def _inputs(k, dtype, device, ranks=(16, 8, 8)):
    torch.manual_seed(0)
    h = torch.randn(1, 1, k, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(k, device=device)).to(dtype)
    mats = [torch.randn(r, k, device=device) * 0.02 for r in ranks]
    return h, w, mats


def _check_products(x, views, mats, tol):
    for a, got in zip(mats, views):
        want = x.float().reshape(1, -1) @ a.t()
        assert got.shape == (1, 1, a.shape[0])
        assert torch.allclose(got.reshape(1, -1), want, rtol=tol, atol=tol * want.abs().max().item())


@INTERPRETED
@pytest.mark.parametrize("k", [96, 2048 + 40])  # within one block, and over three with a ragged end
def test_norm_and_down_products_in_one_launch_interpreted(k):
    """fp32: x equals the RMSNorm module's output (1e-6) and each view equals x Aᵢᵀ (1e-5); three
    adapters of different ranks, and one."""
    from qfine.fast.row_prologue import norm_lora_down

    h, w, mats = _inputs(k, torch.float32, "cpu")
    for use in (mats, mats[:1]):
        x, views = norm_lora_down(h, w, 1e-5, use)
        assert torch.allclose(x, _norm(h, w, 1e-5), rtol=1e-6, atol=1e-6)
        _check_products(_norm(h, w, 1e-5), views, use, 1e-5)


@INTERPRETED
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
def test_gated_activation_and_down_products_in_one_launch_interpreted(act):
    """fp32: x equals act(g)·u for SiLU and both GELUs (1e-6), its down-products x Aᵀ (1e-5)."""
    from qfine.fast.row_prologue import gated_lora_down

    g, u, mats = _inputs(3000, torch.float32, "cpu", ranks=(16,))
    g = g * 3
    u = u.reshape(1, 1, -1)
    x, views = gated_lora_down(g, u, act, mats)
    want = _gated(g, u, act)
    assert torch.allclose(x, want, rtol=1e-6, atol=1e-6), (x - want).abs().max()
    _check_products(want, views, mats, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [4096, 14336])
def test_gpu_prologues_round_as_the_modules(k, dtype, act):
    """bf16/fp16 at the 8B widths: the normed x and the gated x equal the eager modules' values (rounded after
    the norm and again after the weight; after the activation and again after the product) except for rare
    one-unit roundings where the sums' order, sqrt and exp differ: ≥ 99.5 % of elements identical, none off by
    more than one unit in the last place. (Inductor's compiled norm keeps the first rounding's fp32 value and
    differs from the module in about a fifth of the elements.) The down-products equal x Aᵢᵀ of the
    kernel's own x (1e-4)."""
    from qfine.fast.row_prologue import gated_lora_down, norm_lora_down

    h, w, mats = _inputs(k, dtype, "cuda")
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)

    def same(got, want):
        diff = (got.float() - want.float()).abs()
        assert (diff == 0).float().mean() >= 0.995, (diff == 0).float().mean()
        assert (diff <= want.float().abs() * ulp * 1.01).all()

    x, views = norm_lora_down(h, w, 1e-5, mats)
    same(x, _norm(h, w, 1e-5))
    _check_products(x, views, mats, 1e-4)
    u = torch.randn_like(h)
    x, views = gated_lora_down(h * 3, u, act, mats[:1])
    same(x, _gated(h * 3, u, act))
    _check_products(x, views, mats[:1], 1e-4)
