"""The decode step's attention over a static KV cache (:mod:`qfine.fast.attn_decode`) against torch's masked
``scaled_dot_product_attention``: on the CPU under Triton's interpreter (fp32) and on the GPU (bf16)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_early_launch_equals_plain

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


DOT = {"steps": 1, "last_adds": True, "block": 32, "dot": True}  # one run of 32 slots, matrix products


def _reference(q, keys, values, pad, slot, scale):
    """Masked SDPA in fp32: key slot j seen by row b iff pad[b] <= j <= slot."""
    b, heads, _, d = q.shape
    kv, length = keys.shape[1], keys.shape[2]
    j = torch.arange(length, device=q.device)
    seen = (j[None, :] >= pad[:, None]) & (j[None, :] <= slot)
    mask = torch.where(seen, 0.0, float("-inf"))[:, None, None, :]
    qg = q.float().reshape(b, kv, heads // kv, d)
    out = F.scaled_dot_product_attention(qg, keys.float(), values.float(), attn_mask=mask, scale=scale)
    return out.reshape(b, heads, 1, d)


def _case(device, dtype, b=3, kv=2, group=4, length=80, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, kv * group, 1, d, generator=g).to(device, dtype)
    keys = torch.randn(b, kv, length, d, generator=g).to(device, dtype)
    values = torch.randn(b, kv, length, d, generator=g).to(device, dtype)
    return q, keys, values


@pytest.mark.skipif(not INTERPRETED, reason="runs Triton kernels on the CPU: TRITON_INTERPRET=1 with triton")
@pytest.mark.parametrize("group", [1, 4, 3])
def test_decode_attention_equals_masked_sdpa_interpreted(group, monkeypatch):
    """fp32, 3 rows with different prompt starts, GQA groups of 1, 4 and 3 query heads per kv head, a cache of 80
    slots (the last split partly past it), the current slot at 0, inside a split and at the end: equal to masked
    SDPA within 1e-5, the partials added by the last program or, without a counter, by a second kernel (the same
    sums, so the same bits), and as well 2 splits a load or 2 and 4 runs of 16 slots a program, or 1 and 2 runs
    of 32 slots with matrix products (which also write the step's k, v and apply RoPE); with RoPE applied
    by the launch, as when applied before; given the step's k and v, the same result with NaN in the cache at the
    slot, which then holds them; a slot past every row's view (its splits skipped) changes nothing."""
    from qfine.fast.attn_decode import decode_attention

    q, keys, values = _case("cpu", torch.float32, group=group)
    pad = torch.tensor([0, 5, 17])
    for cur in (17, 40, 79):
        slot = torch.tensor([cur])
        got = decode_attention(q, keys, values, pad, slot, 0.3)
        want = _reference(q, keys, values, pad, cur, 0.3)
        assert got.shape == want.shape and got.dtype == q.dtype
        assert (got - want).abs().max() < 1e-5, (group, cur, (got - want).abs().max())
        with monkeypatch.context() as patch:  # no counter to be had: the partials added by a second kernel
            patch.setattr("qfine.fast.attn_decode._counter", lambda device, n: None)
            assert torch.equal(decode_attention(q, keys, values, pad, slot, 0.3), got)
        for cfg in ({"steps": 2, "last_adds": True}, {"steps": 4, "last_adds": False},  # runs of 32, 64 slots
                    DOT, {"steps": 2, "last_adds": False, "block": 32, "dot": True}):  # matrix products
            longer = decode_attention(q, keys, values, pad, slot, 0.3, config=cfg)
            assert (longer - want).abs().max() < 1e-5, (group, cur, cfg, (longer - want).abs().max())
        with monkeypatch.context() as patch:  # 2 of the 5 splits a load: the sums rescaled as the maximum grows
            patch.setattr("qfine.fast.attn_decode.ADD_TILE", 2 * (1 << (group - 1).bit_length()) * 32)
            chunked = decode_attention(q, keys, values, pad, slot, 0.3)
            assert (chunked - want).abs().max() < 1e-5, (group, cur, (chunked - want).abs().max())
    # the step's own k, v given: written into the cache at the slot, and the result as with them there
    slot = torch.tensor([40])
    want = decode_attention(q, keys, values, pad, slot, 0.3)
    want_dot = decode_attention(q, keys, values, pad, slot, 0.3, config=DOT)
    new = (keys[:, :, 40:41].clone(), values[:, :, 40:41].clone())
    keys[:, :, 40], values[:, :, 40] = float("nan"), float("nan")
    assert torch.equal(decode_attention(q, keys.clone(), values.clone(), pad, slot, 0.3, new=new, config=DOT),
                       want_dot)
    assert torch.equal(decode_attention(q, keys, values, pad, slot, 0.3, new=new), want)
    assert torch.equal(keys[:, :, 40:41], new[0]) and torch.equal(values[:, :, 40:41], new[1])
    # RoPE in the launch: q and the new k before it, each row at its own position slot − pad (0 for the
    # row whose prompt starts past the slot), as the model's RoPE applied first
    from qfine.fast.ops import rope

    cos, sin = torch.randn(80, 32), torch.randn(80, 32)
    pos = (40 - pad).clamp_min(0)[:, None]  # (b, 1)
    qr = rope(q.transpose(1, 2), cos[pos], sin[pos]).transpose(1, 2)
    kr = rope(new[0].transpose(1, 2), cos[pos], sin[pos]).transpose(1, 2)
    want = decode_attention(qr, keys.clone(), values.clone(), pad, slot, 0.3, new=(kr, new[1]))
    got_dot = decode_attention(q, keys.clone(), values.clone(), pad, slot, 0.3, new=new, rope=(cos, sin), config=DOT)
    got = decode_attention(q, keys, values, pad, slot, 0.3, new=new, rope=(cos, sin))
    assert (got - want).abs().max() < 1e-5 and (keys[:, :, 40:41] - kr).abs().max() < 1e-5
    assert (got_dot - want).abs().max() < 1e-5
    keys[:, :, 40:41] = new[0]
    # slots past the current one hold other values: they must not be read
    before = decode_attention(q, keys, values, pad, slot, 0.3)
    keys[:, :, 41:] = 1e4
    values[:, :, 41:] = float("nan")
    assert torch.equal(decode_attention(q, keys, values, pad, slot, 0.3), before)


@pytest.mark.skipif(not INTERPRETED, reason="runs Triton kernels on the CPU: TRITON_INTERPRET=1 with triton")
@pytest.mark.parametrize("group", [4, 3])
def test_the_launch_adds_the_next_projections_down_product_interpreted(group, monkeypatch):
    """Given A (r, heads·d) of the o projection's adapter, the launch also returns xa = out · Aᵀ (fp32 sums,
    rounded once to A's dtype), each kv head's share added by the last share of its row: for ranks 8, 16 and
    40 (A read in pieces of rows), fp32 and fp16 A (the interpreter rounds to bf16 by truncation), the
    partials added by the last program, by a second kernel, or with no counter to be had (then by torch);
    the attention's output is unchanged bit for bit."""
    from qfine.fast.attn_decode import decode_attention

    q, keys, values = _case("cpu", torch.float32, group=group)
    b, heads, _, d = q.shape
    pad, slot = torch.tensor([0, 5, 17]), torch.tensor([40])
    plain = decode_attention(q, keys, values, pad, slot, 0.3)
    ran = 0
    for r, dtype in ((8, torch.float32), (16, torch.float16), (40, torch.float32)):
        a = (torch.randn(r, heads * d) * 0.1).to(dtype)
        want = plain.reshape(b, heads * d).to(dtype).float() @ a.float().t()
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -10  # fp16: the one rounding of xa
        for cfg in ({"steps": 1, "last_adds": True}, {"steps": 2, "last_adds": False}, DOT, None):
            with monkeypatch.context() as patch:
                if cfg is None:  # no counter: the partials by a second kernel, the product by torch
                    patch.setattr("qfine.fast.attn_decode._counter", lambda device, n: None)
                out, xa = decode_attention(q, keys, values, pad, slot, 0.3, config=cfg, down=a)
                alone = decode_attention(q, keys, values, pad, slot, 0.3, config=cfg)
            assert torch.equal(out, alone), (r, cfg)  # the output as without the down-product
            assert xa.shape == (b, r) and xa.dtype == dtype
            err = ((xa.float() - want).abs() / want.abs().max()).max()
            assert err < tol, (r, dtype, cfg, err.item())
            ran += 1
    assert ran == 12
    # with a small tile A is read a few rows a load: the same sums
    with monkeypatch.context() as patch:
        patch.setattr("qfine.fast.attn_decode.ADD_TILE", 4 * (1 << (group - 1).bit_length()) * d)
        a = torch.randn(40, heads * d) * 0.1
        _, xa = decode_attention(q, keys, values, pad, slot, 0.3, down=a)
        want = plain.reshape(b, heads * d) @ a.t()
        assert ((xa - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_attention_at_8b_shapes(monkeypatch):
    """bf16 at the Llama-3.1-8B attention shape (32 query heads over 8 kv heads, d = 128), batch 1 and 16, a
    cache of 512 slots, every launch setting and the tuned one: within 1e-2 of fp32 masked SDPA (one bf16
    rounding of the output), and replayed from a CUDA graph with the slot changed on the device, equal to the
    eager call; given the step's k and v, the same output with the cache's slot written by the launch; given
    o's LoRA A, the same output and xa within 1e-5 of the fp32 product, eager and replayed."""
    from qfine.fast.attn_decode import DOT, LAST_ADDS, decode_attention, settings, tuned

    monkeypatch.setitem(DOT, "on", True)  # every setting, the matrix products' runs among them
    for b in (1, 16):
        q, keys, values = _case("cuda", torch.bfloat16, b=b, kv=8, group=4, length=512, d=128)
        pad = torch.randint(0, 30, (b,), device="cuda")
        want = _reference(q, keys, values, pad, 300, 128 ** -0.5)
        for cfg in settings(512) + [None]:
            slot = torch.tensor([300], device="cuda")
            got = decode_attention(q, keys, values, pad, slot, 128 ** -0.5, config=cfg)
            assert ((got.float() - want).abs().max() / want.abs().max()) < 1e-2, cfg
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = decode_attention(q, keys, values, pad, slot, 128 ** -0.5, config=cfg)
            slot.fill_(411)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, decode_attention(q, keys, values, pad, slot, 128 ** -0.5, config=cfg)), cfg
            # the step's k, v written by the launch itself: the same output, and the cache holds them
            # the setting tuned for the call without k, v, for the call with them
            fixed = cfg or tuned(q, keys, values, pad, slot, 128 ** -0.5, 16, None, None)
            new = (keys[:, :, 411:412].clone(), values[:, :, 411:412].clone())
            keys[:, :, 411], values[:, :, 411] = float("nan"), float("nan")
            assert torch.equal(decode_attention(q, keys, values, pad, slot, 128 ** -0.5, new=new, config=fixed), out)
            assert torch.equal(keys[:, :, 411:412], new[0]) and torch.equal(values[:, :, 411:412], new[1])
            # o's LoRA down-product (r = 16, fp32 A) added by the same launch, captured too: the same output
            a = torch.randn(16, 32 * 128, device="cuda") * 0.02
            plain, xa = decode_attention(q, keys, values, pad, slot, 128 ** -0.5, config=fixed, down=a)
            assert torch.equal(plain, out), cfg
            want_xa = out.reshape(b, -1).float() @ a.t()
            assert ((xa - want_xa).abs().max() / want_xa.abs().max()) < 1e-5, cfg
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _, xa_graph = decode_attention(q, keys, values, pad, slot, 128 ** -0.5, config=fixed, down=a)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(xa_graph, xa), cfg
    # the last-program variant built: it is among them; and the matrix products' runs of 32 and 64 slots
    assert len(settings(512)) == 12 and LAST_ADDS["ok"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_early_launch_chain_through_the_attention(monkeypatch):
    """Programmatic dependent launches (sm_90 on) through a layer's attention: the 4-bit kernel makes q, the
    attention (which requests its first run of the cache before waiting, and adds o's down-product) reads
    it, and the 4-bit kernel for o reads the attention's output, xa and the residual. Eager and replayed from
    a CUDA graph with a new input before each replay, for both ways of adding the partials, the outputs equal
    the plain launches' bit for bit (a read of q before the wait would see the previous input)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    import bitsandbytes as bnb

    from qfine.fast import mma_kernel
    from qfine.fast.attn_decode import decode_attention
    from qfine.fast.gemv_rows import _sum_splits

    torch.manual_seed(0)
    weights = [bnb.nn.Params4bit(torch.randn(4096, 4096, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                 quant_type="nf4", compress_statistics=True).cuda() for _ in range(2)]
    a = torch.randn(16, 4096, device="cuda") * 0.02
    b = torch.randn(4096, 16, device="cuda") * 0.1
    _, keys, values = _case("cuda", torch.bfloat16, b=1, kv=8, group=4, length=512, d=128)
    new = (torch.randn(1, 8, 1, 128, dtype=torch.bfloat16, device="cuda"),
           torch.randn(1, 8, 1, 128, dtype=torch.bfloat16, device="cuda"))
    pad, slot = torch.zeros(1, dtype=torch.long, device="cuda"), torch.tensor([300], device="cuda")
    h = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    cfg = next(c for c in mma_kernel.candidates(1) if mma_kernel.fits(c, 1, 4096, 64) and c["SPLIT"] == 1)
    inputs = [torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    for adds in ({"steps": 1, "last_adds": True}, {"steps": 2, "last_adds": False}):
        def step(adds=adds):
            q = mma_kernel.matmul_mma(h, weights[0], None, None, cfg, _sum_splits)
            out, xa = decode_attention(q.view(1, 32, 1, 128), keys, values, pad, slot, 128 ** -0.5, new=new,
                                       config=adds, down=a)
            return mma_kernel.matmul_mma(out.reshape(1, 4096), weights[1], (xa, b, 2.0), h, cfg, _sum_splits)

        assert_early_launch_equals_plain(monkeypatch, step, h, inputs, adds)
