"""The CUDA C++ tensor-core 4-bit kernel (:mod:`qfine.fast.mma_kernel`, ``mma4.cu``) against the product it
must equal: the code book's values in the activation dtype times each block's fp32 absmax, times x, in fp32.
GPU only (NVRTC compiles it for the device)."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_early_launch_equals_plain

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# ways of requesting the weights (mma4.cu's L2B, AHEAD, BULK); AHEAD 8 and BULK 8 are more loop steps than
# a warp has here (k = 4096: 1 to 16), BULK 2 requests its pieces inside the loop
FETCH = [{"L2B": 256}, {"AHEAD": 2}, {"L2B": 128, "AHEAD": 8}, {"BULK": 2}, {"BULK": 8, "L2B": 256}]


def _weight(n: int, k: int, quant_type: str, nested: bool, blocksize: int, dtype: torch.dtype):
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(torch.randn(n, k, dtype=dtype) * 0.02, requires_grad=False, quant_type=quant_type,
                             compress_statistics=nested, blocksize=blocksize).cuda()


def _decoded(w, dtype: torch.dtype) -> torch.Tensor:
    """W (n, k) in fp32 as the kernel multiplies it: code[q] rounded to ``dtype``, times the block's absmax."""
    import bitsandbytes.functional as bnbf

    state = w.quant_state
    n, k = state.shape
    byte = w.data.reshape(-1).to(torch.int64)
    codes = torch.stack([byte >> 4, byte & 15], 1).reshape(n, k)
    absmax = state.absmax.float()
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    values = state.code.float().to(dtype).float()[codes]
    return (values.reshape(n, k // state.blocksize, state.blocksize) * absmax.reshape(n, -1, 1)).reshape(n, k)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within one rounding of the output dtype per element (plus fp32 summation noise)."""
    ulp = 2.0 ** -8 if got.dtype == torch.bfloat16 else 2.0 ** -11
    return bool(((got.float() - want).abs() <= ulp * want.abs() + 1e-5 * want.abs().max()).all())


@pytest.mark.parametrize("case", [
    dict(quant_type="nf4", nested=True, blocksize=64, dtype=torch.bfloat16, adapter=torch.float32),
    dict(quant_type="fp4", nested=False, blocksize=64, dtype=torch.float16, adapter=torch.bfloat16),
    dict(quant_type="nf4", nested=True, blocksize=128, dtype=torch.bfloat16, adapter=torch.bfloat16),
], ids=["nf4-nested-64-bf16", "fp4-plain-64-fp16", "nf4-nested-128-bf16"])
def test_gpu_mma_kernel_equals_decoded_product(case, monkeypatch):
    """"mma" settings (both table layouts, 1 and 2 row tiles per warp, k split inside a block and across blocks,
    2 and 4 row groups per block) for 1, 3 and 16 token rows and (QFINE_MMA_ROWS=64: 4 and 8 token tiles,
    the epilogue's inputs read after the loop) 33 and 64, each also with the weights requested with an
    L2 fetch size or prefetched steps ahead (:data:`FETCH`: the same bits),
    n = 1040 (a last tile only half inside W): each output element within one rounding of x Wᵀ + s·xa Bᵀ
    computed in fp32 from the decoded W; with a residual, exactly round(res + round(y)); and replayed in a
    CUDA graph, the eager output bit for bit."""
    from qfine.fast.gemv_rows import _sum_splits
    from qfine.fast.mma_kernel import ROWS, candidates, fits, matmul_mma, precompile

    monkeypatch.setitem(ROWS, "max", 64)
    torch.manual_seed(0)
    n, k, dtype = 1040, 4096, case["dtype"]
    w = _weight(n, k, case["quant_type"], case["nested"], case["blocksize"], dtype)
    deq = _decoded(w, dtype)
    b = torch.randn(n, 16, dtype=case["adapter"], device="cuda") * 0.1
    ran, expected = 0, 0
    for m in (1, 3, 16, 33, 64):
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        xa_all = torch.randn(m, 40, dtype=case["adapter"], device="cuda")
        xa = xa_all[:, 8:24]  # a column view, as the fused down-products give it
        want = x.float() @ deq.t() + 2.0 * xa.float() @ b.float().t()
        res = torch.randn(m, n, dtype=dtype, device="cuda")
        # both table layouts, 1 and 2 row tiles, k split within the block and across blocks, row groups
        fitting = [cfg for cfg in candidates(m) if fits(cfg, m, k, case["blocksize"])
                   and (cfg["WARPS"], cfg["RW"], cfg["SPLIT"]) in ((4, 1, 1), (8, 1, 2), (2, 2, 1), (1, 4, 1))]
        assert len(fitting) >= 4, m
        expected += len(fitting)
        fetched = [{**cfg, **fetch} for cfg in fitting for fetch in FETCH]
        for residual in (None, res):  # compiled side by side on the CPU's cores
            precompile(x, [(w, (xa, b, 2.0))], residual, fitting + (fetched if residual is None else []))
        for cfg in fitting:
            got = matmul_mma(x, w, (xa, b, 2.0), None, cfg, _sum_splits)
            assert got.dtype == dtype and got.shape == (m, n)
            assert _close(got, want), (m, cfg, ((got.float() - want).abs().max() / want.abs().max()).item())
            for fetch in FETCH:  # the weights requested another way: the same arithmetic, the same bits
                assert torch.equal(matmul_mma(x, w, (xa, b, 2.0), None, {**cfg, **fetch}, _sum_splits), got), fetch
            with_res = matmul_mma(x, w, (xa, b, 2.0), res, cfg, _sum_splits)
            assert torch.equal(with_res, (res.float() + got.float()).to(dtype)), (m, cfg)
            ran += 1
        plain = matmul_mma(x, w, None, None, fitting[0], _sum_splits)
        assert _close(plain, x.float() @ deq.t()), m
        graph = torch.cuda.CUDAGraph()
        out = {}
        with torch.cuda.graph(graph):
            out["y"] = matmul_mma(x, w, (xa, b, 2.0), res, fitting[-1], _sum_splits)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out["y"], matmul_mma(x, w, (xa, b, 2.0), res, fitting[-1], _sum_splits))
    assert ran == expected


def test_gpu_tuner_times_the_mma_kernel():
    """At the Llama-3.1-8B MLP shape (14336 × 4096, NF4, bf16, one row) the tuner times the "mma" settings
    beside the Triton kernels and bitsandbytes, and its choice agrees with dequantize-then-matmul."""
    import bitsandbytes as bnb

    from qfine.fast import gemv_kernel as G

    torch.manual_seed(0)
    w = _weight(14336, 4096, "nf4", True, 64, torch.bfloat16)
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    y = G.matmul_4bit(x, w)
    want = x.float() @ bnb.functional.dequantize_4bit(w.data, w.quant_state).float().t()
    assert ((y.float() - want).abs().max() / want.abs().max()) < 8e-3
    timed = next(v for key, v in G.TUNED.items() if key[2:4] == (14336, 4096))
    kinds = {cfg.get("KERNEL") for _, cfg in timed}
    assert "mma" in kinds, kinds
    print("tuned", [(round(s * 1e6, 2), cfg) for s, cfg in timed[:4]])


def test_gpu_mma_silu_pair_equals_the_two_products_then_silu(monkeypatch):
    """gate and up (1040 × 4096, NF4, bf16) with their adapters in one launch, for 1, 16 and 64 rows (64:
    QFINE_MMA_ROWS=64), every pair
    setting: within one bf16 rounding of silu(round(g))·round(u) from the decoded products (fp32); and the
    tuned entry point returns the same tensor as the kernel it chose, or None where the two launches are faster."""
    import torch.nn.functional as F

    from qfine.fast.gemv_kernel import matmul_4bit_silu
    from qfine.fast.mma_kernel import ROWS, fits, matmul_mma_silu, pair_candidates, precompile

    monkeypatch.setitem(ROWS, "max", 64)
    torch.manual_seed(0)
    n, k = 1040, 4096
    ws = [_weight(n, k, "nf4", True, 64, torch.bfloat16) for _ in range(2)]
    decs = [_decoded(w, torch.bfloat16) for w in ws]
    bs = [torch.randn(n, 16, dtype=torch.bfloat16, device="cuda") * 0.1 for _ in ws]
    for m in (1, 16, 64):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        xa_all = torch.randn(m, 32, dtype=torch.bfloat16, device="cuda")
        xas = [xa_all[:, :16], xa_all[:, 16:]]
        g, u = [(x.float() @ d.t() + s * xa.float() @ b.float().t()).to(torch.bfloat16).float()
                for d, xa, b, s in zip(decs, xas, bs, (2.0, 0.5))]
        want = F.silu(g) * u
        members = [(w, (xa, b, s)) for w, xa, b, s in zip(ws, xas, bs, (2.0, 0.5))]
        settings = [cfg for cfg in pair_candidates(m) if fits(cfg, m, k, 64)]
        assert settings
        precompile(x, members, None, settings, pair=True)  # side by side on the CPU's cores
        for cfg in settings:
            got = matmul_mma_silu(x, *members, cfg)
            assert got.shape == (m, n) and got.dtype == torch.bfloat16
            # g and u themselves may round the other way (fp32 sums in another order): a few units off
            err = (got.float() - want).abs() / (want.abs() + 1e-3 * want.abs().max())
            assert err.max() < 3e-2 and err.mean() < 3e-3, (m, cfg, err.max().item(), err.mean().item())
        tuned = matmul_4bit_silu(x, *members)
        assert tuned is None or ((tuned.float() - want).abs().max() / want.abs().max()) < 2e-2


def test_gpu_mma_group_equals_each_product(monkeypatch):
    """q, k and v shapes (1040, 272, 272 rows × 4096; NF4, bf16, r = 16 adapters as column views of one xa)
    in one launch, for 1, 16 and 64 rows (64: QFINE_MMA_ROWS=64) and every group setting: each output within
    one rounding of its own
    x Wᵢᵀ + sᵢ·xaᵢ Bᵢᵀ (fp32 from the decoded weight), rows of one weight never written from another's;
    replayed in a CUDA graph, the eager outputs bit for bit; and the tuned grouped entry point agrees."""
    from qfine.fast.gemv_kernel import matmul_4bit_group
    from qfine.fast.mma_kernel import ROWS, fits, group_candidates, matmul_mma_group, precompile

    monkeypatch.setitem(ROWS, "max", 64)
    torch.manual_seed(0)
    k, shapes, scales = 4096, (1040, 272, 272), (2.0, 0.5, 1.0)
    ws = [_weight(n, k, "nf4", True, 64, torch.bfloat16) for n in shapes]
    decs = [_decoded(w, torch.bfloat16) for w in ws]
    bs = [torch.randn(n, 16, dtype=torch.bfloat16, device="cuda") * 0.1 for n in shapes]
    for m in (1, 16, 64):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        xa_all = torch.randn(m, 48, dtype=torch.bfloat16, device="cuda")
        xas = [xa_all[:, 16 * i:16 * (i + 1)] for i in range(3)]
        members = [(w, (xa, b, s)) for w, xa, b, s in zip(ws, xas, bs, scales)]
        wants = [x.float() @ d.t() + s * xa.float() @ b.float().t() for d, xa, b, s in zip(decs, xas, bs, scales)]
        settings = [cfg for cfg in group_candidates(m) if fits(cfg, m, k, 64)]
        assert len(settings) >= 8
        precompile(x, members, None, settings)  # side by side on the CPU's cores
        for cfg in settings:
            got = matmul_mma_group(x, members, cfg)
            assert [tuple(y.shape) for y in got] == [(m, n) for n in shapes]
            for i, (y, want) in enumerate(zip(got, wants)):
                assert _close(y, want), (m, cfg, i, ((y.float() - want).abs().max() / want.abs().max()).item())
        graph, out = torch.cuda.CUDAGraph(), {}
        with torch.cuda.graph(graph):
            out["y"] = matmul_mma_group(x, members, settings[-1])
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(out["y"], matmul_mma_group(x, members, settings[-1])))
        tuned = matmul_4bit_group(x, members)
        assert tuned is None or all(((y.float() - want).abs().max() / want.abs().max()) < 8e-3
                                    for y, want in zip(tuned, wants))


def test_gpu_early_launch_equals_the_plain_one(monkeypatch):
    """Programmatic dependent launches (sm_90 on), two rounds of a layer's chain: the down-product kernel
    with the norm in its launch, then the 4-bit kernel reading its outputs and the residual, then again on that
    output; each kernel may start while the one before runs and waits before reading what it wrote. Eager and
    replayed from a CUDA graph with a new input before each replay, the outputs equal the plain launches' bit
    for bit (a read before the wait would see the previous input)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    from qfine.fast import mma_kernel
    from qfine.fast.gemv_rows import _sum_splits
    from qfine.fast.lora_down import lora_down

    torch.manual_seed(0)
    w = _weight(4096, 4096, "nf4", True, 64, torch.bfloat16)
    a = torch.randn(16, 4096, device="cuda") * 0.02
    b = torch.randn(4096, 16, device="cuda") * 0.1
    norm = (torch.rand(4096, dtype=torch.bfloat16, device="cuda") + 0.5, 1e-5)
    h = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    cfg = next(c for c in mma_kernel.candidates(1) if mma_kernel.fits(c, 1, 4096, 64) and c["SPLIT"] == 1)

    def step():
        y = h
        for _ in range(2):
            (xa,), x = lora_down(y, [a], norm=norm)
            y = mma_kernel.matmul_mma(x, w, (xa, b, 2.0), y, cfg, _sum_splits)
        return y

    inputs = [torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda") * 3 for _ in range(4)]
    assert_early_launch_equals_plain(monkeypatch, step, h, inputs)
