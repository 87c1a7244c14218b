"""The byte-permute code-book decode (executed here with PTX's ``prmt`` semantics, on the CPU) and
:mod:`qfine.fast.gemv_rows`' kernels against dequantize-then-matmul (under Triton's CPU interpreter)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from qfine.fast.prmt_decode import code_words, decode_program
from qfine.generation import engine


def _prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` default mode: output byte i is byte (c >> 4i) & 7 of b:a, or that byte's sign
    replicated when bit 3 of the nibble is set."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> 4 * i) & 0xF
        byte = src[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


OPS = {"mov": lambda a: a, "and": lambda a, b: a & b, "or": lambda a, b: a | b, "shr": lambda a, b: a >> b,
       "shl": lambda a, b: a << b, "prmt": _prmt}


def _run(prog, word: int, tables: list[int], at: int = 8, step: int = 1) -> dict:
    regs = {f"${at}": word} | {f"${at + step * (1 + i)}": t for i, t in enumerate(tables)}
    for op, dst, *src in prog:
        regs[dst] = OPS[op](*(v if isinstance(v, int) else regs[v] for v in src)) & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_byte_permutes_give_each_weights_code_value(quant_type, dtype):
    """Every byte value at every position of a word, and random words: the decode's outputs are the 16-bit
    code values of the word's 8 weights in order (high nibble first), as pairs ("b16", also with the
    registers of the "pairs" PTX: word at $4, tables every other register), and as floats ("f32", bf16
    only) equal to code[c] rounded to bf16."""
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type(quant_type, device="cpu")
    bits = [int(v) & 0xFFFF for v in code.to(dtype).view(torch.int16).tolist()]
    assert len(set(bits)) >= 15  # a real book (FP4 holds +0 and -0)
    rng = random.Random(0)
    words = [b << 8 * pos | rng.getrandbits(32) & ~(0xFF << 8 * pos) for b in range(256) for pos in range(4)]
    words += [rng.getrandbits(32) for _ in range(500)] + [0, 0xFFFFFFFF]
    tables = code_words(code, dtype)
    forms = [("b16", 8, 1), ("b16", 4, 2)] + ([("f32", 8, 1)] if dtype == torch.bfloat16 else [])
    for out, at, step in forms:
        prog = decode_program(out, at, step)
        for word in words:
            regs = _run(prog, word, tables, at, step)
            want = [bits[(word >> 8 * j + shift) & 0xF] for j in range(4) for shift in (4, 0)]
            if out == "b16":
                got = [(regs[f"${i // 2}"] >> 16 * (i % 2)) & 0xFFFF for i in range(8)]
            else:
                got = [regs[f"${i}"] >> 16 for i in range(8)]
                assert all(regs[f"${i}"] & 0xFFFF == 0 for i in range(8))
                floats = torch.tensor([regs[f"${i}"] for i in range(8)], dtype=torch.int64).to(torch.int32)
                assert floats.view(torch.float32).tolist() == [
                    code[(word >> 8 * j + shift) & 0xF].to(torch.bfloat16).item() for j in range(4) for shift in (4, 0)]
            assert got == want, (out, hex(word))


@pytest.mark.skipif(not engine._INTERPRETED, reason="runs Triton kernels on the CPU: TRITON_INTERPRET=1 with triton")
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_rows_kernels_equal_dequantize_then_matmul_interpreted(quant_type, nested):
    """Under Triton's interpreter in fp32 (the gather decode): the one-row and tensor-core kernels, with k
    split or not (summed by a second kernel, or by the last program of each column tile, whose counters
    must be back at zero for the next call to be right), equal dequantize-then-matmul (1e-5 relative), and
    with an adapter's term (xa a column view) and a residual equal residual + (x Wᵀ + s·xa Bᵀ) (1e-5)."""
    import bitsandbytes as bnb

    from qfine.fast.gemv_rows import fits, matmul_rows

    torch.manual_seed(0)
    n, k = 72, 512
    w = bnb.nn.Params4bit(torch.randn(n, k) * 0.02, requires_grad=False, quant_type=quant_type,
                          compress_statistics=nested)._quantize("cpu")
    deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    settings = [{"KERNEL": "row", "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT": 1, "num_warps": 4, "PREFETCH": True},
                {"KERNEL": "row", "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT": 2, "num_warps": 4, "PREFETCH": False},
                {"KERNEL": "tc", "BLOCK_N": 32, "SPLIT": 1, "num_warps": 4},
                {"KERNEL": "tc", "BLOCK_N": 16, "SPLIT": 4, "num_warps": 4},
                {"KERNEL": "tc", "BLOCK_N": 16, "SPLIT": 4, "num_warps": 4, "SERIAL": True}]
    ran = 0
    for m in (1, 3):
        # xa a column view of wider rows, as the fused down-products return it (row stride 24, not 8)
        x, xa = torch.randn(m, k), torch.randn(m, 24)[:, 8:16]
        b, res = torch.randn(n, 8), torch.randn(m, n)
        want = x @ deq.t()
        for cfg in settings:
            if not fits(cfg, m, k, w.quant_state.blocksize):
                continue
            got = matmul_rows(x, w, None, None, cfg, True)
            assert ((got - want).abs().max() / want.abs().max()) < 1e-5, (m, cfg)
            both = matmul_rows(x, w, (xa, b, 2.0), res, cfg, True)
            assert (both - (res + want + 2.0 * xa @ b.t())).abs().max() < 1e-5 * want.abs().max() * 10, (m, cfg)
            ran += 1
    assert ran == 8  # the one-row kernel serves one row only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_byte_permute_decode_equals_the_gather(dtype):
    """On the GPU: each kernel with the code book decoded by byte permutes (inline PTX) gives exactly the
    output of the same kernel decoding by a 16-entry gather (the same values, so the same sums), NF4 and FP4,
    for 1 and 16 rows, with k split and summed by the last program, the one-row kernel with x read as bf16
    or as int32 pairs; and within 1e-2 of dequantize-then-matmul."""
    import bitsandbytes as bnb

    from qfine.fast.gemv_rows import matmul_rows

    torch.manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        w = bnb.nn.Params4bit(torch.randn(1024, 2048, dtype=dtype) * 0.02, requires_grad=False,
                              quant_type=quant_type, compress_statistics=True).cuda()
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        settings = [{"KERNEL": "tc", "BLOCK_N": 64, "SPLIT": 1, "num_warps": 4},
                    {"KERNEL": "tc", "BLOCK_N": 128, "SPLIT": 4, "num_warps": 4, "SERIAL": True}]
        if dtype == torch.bfloat16:
            settings += [{"KERNEL": "row", "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT": 2, "num_warps": 4,
                          "PREFETCH": True, "XPAIRS": xpairs} for xpairs in (False, True)]
        for rows in (1, 16):
            x = torch.randn(rows, 2048, dtype=dtype, device="cuda")
            want = x.float() @ deq.t()
            for cfg in settings:
                if cfg["KERNEL"] == "row" and rows > 1:
                    continue
                fast = matmul_rows(x, w, None, None, cfg | {"PRMT": True}, False)
                plain = matmul_rows(x, w, None, None, cfg | {"PRMT": False}, False)
                assert torch.equal(fast, plain), (quant_type, rows, cfg)
                assert ((fast.float() - want).abs().max() / want.abs().max()) < 1e-2, (quant_type, rows, cfg)


@pytest.mark.skipif(not engine._INTERPRETED, reason="runs Triton kernels on the CPU: TRITON_INTERPRET=1 with triton")
def test_grouped_launch_equals_each_product_interpreted():
    """Three weights of one input (q, k, v shapes: 96, 32, 32 rows) in one tensor-core launch, with their
    adapters' xa as column views of one buffer (as the fused down-products give them): each output equals
    x Wᵢᵀ + sᵢ·xaᵢ Bᵢᵀ (1e-5 relative), with k split (serial sum) or not, for 1 and 3 rows; two weights
    (gate, up) too. Weights of different k are not grouped."""
    import bitsandbytes as bnb

    from qfine.fast.gemv_rows import groupable, matmul_group

    torch.manual_seed(0)
    k = 256
    ws = [bnb.nn.Params4bit(torch.randn(n, k) * 0.02, requires_grad=False, quant_type="nf4",
                            compress_statistics=True)._quantize("cpu") for n in (96, 32, 32)]
    deqs = [bnb.functional.dequantize_4bit(w.data, w.quant_state).float() for w in ws]
    ranks = (8, 4, 8)
    bs = [torch.randn(w.quant_state.shape[0], r) for w, r in zip(ws, ranks)]
    for m in (1, 3):
        x = torch.randn(m, k)
        xa_all = torch.randn(m, sum(ranks))
        xas = [xa_all[:, :8], xa_all[:, 8:12], xa_all[:, 12:]]
        for count in (3, 2):
            members = [(w, (xa, b, 0.5 * (i + 1))) for i, (w, xa, b) in enumerate(zip(ws, xas, bs))][:count]
            assert groupable(x, members)
            for cfg in ({"KERNEL": "tc", "BLOCK_N": 16, "SPLIT": 1, "num_warps": 4},
                        {"KERNEL": "tc", "BLOCK_N": 32, "SPLIT": 2, "num_warps": 4, "SERIAL": True}):
                outs = matmul_group(x, members, cfg, True)
                assert len(outs) == count
                for i, (out, deq) in enumerate(zip(outs, deqs)):
                    want = x @ deq.t() + 0.5 * (i + 1) * xas[i] @ bs[i].t()
                    assert out.shape == want.shape
                    assert ((out - want).abs().max() / want.abs().max()) < 1e-5, (m, count, cfg, i)
    other = bnb.nn.Params4bit(torch.randn(32, 512) * 0.02, requires_grad=False)._quantize("cpu")
    assert not groupable(torch.randn(1, 256), [(ws[0], None), (other, None)])


@pytest.mark.skipif(not engine._INTERPRETED, reason="runs Triton kernels on the CPU: TRITON_INTERPRET=1 with triton")
def test_lora_down_split_along_k_equals_the_products_interpreted():
    """The fused adapter down-products x Aᵢᵀ for one row (k split over programs, partials added by the last)
    and for three rows (a program per output), ranks 8 + 24 and 16 × 3, k 512 and 4096: each within fp32
    summation noise of the fp64 product, called twice (the counter the last program resets serves again)."""
    from qfine.fast.lora_down import lora_down

    torch.manual_seed(0)
    for k, ranks in ((512, (8, 24)), (4096, (16, 16, 16))):
        mats = [torch.randn(r, k) * 0.02 for r in ranks]
        for rows in (1, 1, 3):
            x = torch.randn(rows, k)
            views = lora_down(x, mats)
            assert [tuple(v.shape) for v in views] == [(rows, r) for r in ranks]
            for a, got in zip(mats, views):
                want = x.double() @ a.double().t()
                assert (got.double() - want).abs().max() < 1e-5 * want.abs().max() * k ** 0.5, (k, rows)


@pytest.mark.skipif(not engine._INTERPRETED, reason="runs Triton kernels on the CPU: TRITON_INTERPRET=1 with triton")
def test_lora_down_with_the_norm_equals_norm_then_products_interpreted():
    """The RMSNorm in the down-products' launch (one row, k 512 split over 4 programs, ranks 16 × 3): the
    normalised row equals ops.rms_norm's within fp32 rounding of the statistics, and each product is that
    row's, within fp32 summation noise; three rows are not served (None: the caller runs the norm)."""
    from qfine.fast.lora_down import lora_down
    from qfine.fast.ops import rms_norm

    torch.manual_seed(0)
    k = 512
    mats = [torch.randn(16, k) * 0.02 for _ in range(3)]
    h, weight = torch.randn(1, 1, k) * 3, torch.rand(k) + 0.5
    views, x = lora_down(h, mats, norm=(weight, 1e-5))
    want = rms_norm(h, weight, 1e-5)[0]
    assert x.shape == h.shape and (x - want).abs().max() < 1e-5 * want.abs().max()
    for a, got in zip(mats, views):
        ref = want.reshape(1, k).double() @ a.double().t()
        assert (got.double() - ref).abs().max() < 1e-5 * ref.abs().max() * k ** 0.5
    assert lora_down(torch.randn(3, k), mats, norm=(weight, 1e-5)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_grouped_launch_captures_in_a_graph():
    """q, k, v at the Llama-3.1-8B shapes (4096, 1024, 1024 × 4096), one row, bf16, with their adapters' xa
    as views of one fused down-product: the measured choice (grouped or separate) runs inside a CUDA-graph
    capture — nothing in it waits for the GPU — and the replay gives the eager outputs, each within bf16
    rounding of its own 4-bit product."""
    import bitsandbytes as bnb

    from qfine.fast.gemv_kernel import TUNED, matmul_4bit, matmul_4bit_group
    from qfine.fast.lora_down import lora_down

    torch.manual_seed(0)
    ws = [bnb.nn.Params4bit(torch.randn(n, 4096, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                            quant_type="nf4", compress_statistics=True).cuda() for n in (4096, 1024, 1024)]
    a = [torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in ws]
    b = [torch.randn(w.quant_state.shape[0], 16, dtype=torch.bfloat16, device="cuda") * 0.02 for w in ws]
    x = torch.randn(1, 1, 4096, dtype=torch.bfloat16, device="cuda")

    def step():
        xas = lora_down(x, a)
        members = [(w, (xa, bi, 2.0)) for w, xa, bi in zip(ws, xas, b)]
        got = matmul_4bit_group(x, members)
        return got if got is not None else [matmul_4bit(x, w, lora) for w, lora in members]

    eager = [y.clone() for y in step()]  # measures the settings (outside the capture)
    assert any(key[0] == "group" for key in TUNED)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outs = step()
    graph.replay()
    torch.cuda.synchronize()
    for y, e, w, ai, bi in zip(outs, eager, ws, a, b):
        assert torch.equal(y, e)
        xa = (x.reshape(1, -1).float() @ ai.float().t()).to(torch.bfloat16)
        want = matmul_4bit(x, w, (xa, bi, 2.0)).float()
        assert ((y.float() - want).abs().max() / want.abs().max()) < 2e-2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_table_holds_each_bytes_two_weights_in_k_order(quant_type, dtype):
    """The kernel's 256-entry table (CPU, no GPU needed): for every packed byte, its low half is the weight that
    bitsandbytes' own dequantization puts first along k and its high half the second, as ``dtype`` bits of the
    code value (bitsandbytes dequantizes a weight whose 4,096 bytes are 0..255 repeated, absmax 1)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from qfine.fast.mma_kernel import pair_table

    w = bnb.nn.Params4bit(torch.randn(64, 128) * 0.02, requires_grad=False, quant_type=quant_type,
                          compress_statistics=False)._quantize("cpu")
    state = w.quant_state
    data = torch.arange(256, dtype=torch.uint8).repeat(16).reshape(w.data.shape)
    state.absmax = torch.ones_like(state.absmax)
    weights = bnbf.dequantize_4bit(data, state).float().reshape(-1, 2)  # (4096 bytes, their 2 weights)
    table = pair_table(state, dtype).to(torch.int64) & 0xFFFFFFFF
    bits = torch.stack([table & 0xFFFF, table >> 16], 1).to(torch.int32).to(torch.int16).view(dtype).float()
    byte = data.reshape(-1).to(torch.int64)
    assert torch.equal(bits[byte], weights.to(dtype).float())


@pytest.mark.parametrize("rows", [16, 64])
@pytest.mark.parametrize("k", [576, 4096, 14336])
def test_a_tuned_setting_serves_every_row_count_that_shares_its_timing(k, rows, monkeypatch):
    """The tuner keeps one timing per row tile, so a setting chosen at one row count is reused for every
    other count of its tile: each setting any candidate list offers for m rows must serve every m' of m's
    tile (an "mma" setting of one 8-row token tile does not serve 9 rows), with the "mma" settings offered
    up to 16 rows (the default) or 64 (QFINE_MMA_ROWS=64). The Triton kernels' settings are checked where
    Triton is installed."""
    from qfine.fast import mma_kernel

    monkeypatch.setitem(mma_kernel.ROWS, "max", rows)

    by_tile: dict[int, list[int]] = {}
    for m in range(1, 65):
        by_tile.setdefault(mma_kernel.row_tile(m), []).append(m)
    try:
        from qfine.fast.gemv_kernel import candidates
        from qfine.fast.gemv_rows import fits
        triton = True
    except ImportError:  # no Triton here: the "mma" settings alone
        triton = False
        if k % 256:
            pytest.skip("no mma setting serves this k, and the Triton kernels need Triton")
    checked = 0
    for m in range(1, 65):
        offered = mma_kernel.candidates(m) + mma_kernel.group_candidates(m) + mma_kernel.pair_candidates(m)
        offered += [cfg for cfg in candidates(m, 4096, k) if "KERNEL" in cfg] if triton else []
        for cfg in offered:
            serves = mma_kernel.fits if cfg["KERNEL"] == "mma" else fits
            if not serves(cfg, m, k, 64):
                continue
            for other in by_tile[mma_kernel.row_tile(m)]:
                assert serves(cfg, other, k, 64), (m, other, cfg)
                checked += 1
    assert checked > (1000 if triton else 500)


def test_more_token_tiles_are_offered_only_where_their_sums_fit(monkeypatch):
    """Up to 16 rows by default; with QFINE_MMA_ROWS=64, 17–32 rows get 4 token tiles and 33–64 get 8. A
    setting whose warps meet in shared memory (WARPS > 1) is offered only where the buffer mma4.cu indexes,
    red[((((rw·WARPS + warp)·TILES + i)·NT + j)·4 + e)·32 + lane], fits in the launch's shared memory; the
    largest of them (4 row groups of 4 warps, 2 tiles) does at 2 token tiles and does not at 8."""
    from qfine.fast import mma_kernel as M

    assert M.candidates(17) == [] and {c["NT"] for c in M.candidates(16)} == {2}
    monkeypatch.setitem(M.ROWS, "max", 64)
    assert {c["NT"] for c in M.candidates(20)} == {4} and {c["NT"] for c in M.candidates(64)} == {8}
    assert M.candidates(65) == []
    for m in (1, 16, 32, 64):
        offered = M.candidates(m)
        for cfg in offered:
            if 4096 % (64 * 4 * cfg["WARPS"] * cfg["SPLIT"]):  # k ranges of whole loop steps: the other rule
                continue
            last = ((((cfg["RW"] * cfg["WARPS"] - 1) * cfg["TILES"] + cfg["TILES"] - 1) * cfg["NT"] + cfg["NT"] - 1)
                    * 4 + 3) * 32 + 31
            fits_red = cfg["WARPS"] == 1 or 4 * (last + 1) <= M.shared_bytes(cfg["WIDE"])
            assert M.fits(cfg, m, 4096, 64) == fits_red, (m, cfg)
    big = {"KERNEL": "mma", "WIDE": False, "WARPS": 4, "RW": 4, "TILES": 2, "SPLIT": 1}
    assert M.fits({**big, "NT": 2}, 16, 4096, 64) and not M.fits({**big, "NT": 8}, 64, 4096, 64)


def test_fetch_variants_reach_the_kernels_defines(monkeypatch):
    """QFINE_MMA_FETCH's ways of requesting the weights are parsed (an unknown name is refused, naming it;
    unset, two ways are offered), each comes as a copy of every "mma" setting, and a setting's L2B and AHEAD
    become the kernel's #defines."""
    import bitsandbytes as bnb

    from qfine.fast import mma_kernel

    assert mma_kernel._fetch_variants("L2B=256; AHEAD=4;L2B=128,AHEAD=2;BULK=8") == [
        {"L2B": 256}, {"AHEAD": 4}, {"L2B": 128, "AHEAD": 2}, {"BULK": 8}]
    for bad in ("DEPTH=2", "L2B", "BULK=four"):
        with pytest.raises(ValueError, match=bad):
            mma_kernel._fetch_variants(bad)
    if "QFINE_MMA_FETCH" not in os.environ:  # by default: the plain loads and the two ways that won (H100)
        assert mma_kernel.FETCH == [{"L2B": 256}, {"BULK": 4, "L2B": 256}]
    monkeypatch.setattr(mma_kernel, "FETCH", [])
    plain = mma_kernel.candidates(1)
    assert not any(key in cfg for cfg in plain for key in ("L2B", "AHEAD", "BULK"))
    monkeypatch.setattr(mma_kernel, "FETCH", [{"AHEAD": 4}, {"L2B": 256}])
    offered = mma_kernel.candidates(1)
    assert len(offered) == 3 * len(plain) and offered[:len(plain)] == plain
    assert offered[len(plain)] == {**plain[0], "AHEAD": 4} and offered[-1] == {**plain[-1], "L2B": 256}
    w = bnb.nn.Params4bit(torch.randn(64, 1024) * 0.02, requires_grad=False, quant_type="nf4",
                          compress_statistics=True)._quantize("cpu")
    x = torch.randn(1, 1024, dtype=torch.bfloat16)
    cfg = next(c for c in offered if c.get("AHEAD") and mma_kernel.fits(c, 1, 1024, 64))
    defines = mma_kernel._defines(x, [(w, None)], None, cfg, False)[0]
    assert (defines["AHEAD"], defines["L2B"], defines["BULK"]) == (4, 0, 0)
    defines = mma_kernel._defines(x, [(w, None)], None, {**cfg, "AHEAD": 0, "L2B": 256, "BULK": 4}, False)[0]
    assert (defines["AHEAD"], defines["L2B"], defines["BULK"]) == (0, 256, 4)
