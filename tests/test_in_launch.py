"""4-bit decode launches that compute their own LoRA down-products and RMSNorm (:mod:`qfine.fast.in_launch`,
``mma4.cu`` with ``FD``) against the separate launches they replace (:func:`qfine.fast.lora_down.lora_down`,
then the launch reading its x Aᵀ), and the engine's decode step with them. GPU only, but for the CPU test of
which call sites they serve."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_early_launch_equals_plain, lora_model

PROMPT = [5, 17, 99, 3, 250, 41, 7]

def test_parts_are_whole_runs_of_32():
    """Blocks that post partials: a power of two up to 64 and the launch's blocks, the most whose k slices are
    whole runs of 32, else none."""
    from qfine.fast.mma_kernel import DownProducts

    assert [DownProducts.parts(k, 224) for k in (4096, 14336, 3072, 96, 48)] == [64, 64, 32, 1, 0]
    assert [DownProducts.parts(4096, blocks) for blocks in (48, 33, 16, 1, 0)] == [32, 32, 16, 1, 0]


def test_engine_group_refuses_what_one_launch_cannot_serve(monkeypatch):
    """Which groups one launch serves: a one-row (gate, up) pair with SiLU and a bf16 or fp32 norm, q/k/v and
    down without an activation; not two rows, another activation, an activation on q/k/v or none on the pair,
    a bias, a norm in another dtype. And nothing is served with the switch off or on a CPU tensor."""
    from qfine.fast.mma_kernel import DOWN_IN_LAUNCH
    from qfine.generation import engine

    class Lin:
        a, b, scale, packed, plain = torch.zeros(2, 8), torch.zeros(8, 2), 1.0, None, True

        def __init__(self, bias=False):
            self.base = torch.nn.Linear(8, 8, bias=bias)

        def kernel(self, x):
            return True

    rms = engine._Norm(torch.nn.RMSNorm(8, eps=1e-5, dtype=torch.bfloat16))
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    pair, three, one = engine._Group(Lin(), Lin()), engine._Group(Lin(), Lin(), Lin()), engine._Group(Lin())
    assert pair.in_launch_fits(x, rms, "silu") and three.in_launch_fits(x, rms) and one.in_launch_fits(x)
    assert not pair.in_launch_fits(torch.zeros(2, 8, dtype=torch.bfloat16), rms, "silu")
    assert not pair.in_launch_fits(x, rms, torch.nn.GELU()) and not pair.in_launch_fits(x, rms, "gelu")
    assert not pair.in_launch_fits(x, rms) and not three.in_launch_fits(x, rms, "silu")
    assert not engine._Group(Lin(bias=True)).in_launch_fits(x)
    assert not pair.in_launch_fits(x, engine._Norm(torch.nn.RMSNorm(8, dtype=torch.float16)), "silu")
    assert pair.in_launch(x, rms, act="silu") is None  # the switch off
    monkeypatch.setitem(DOWN_IN_LAUNCH, "on", True)
    assert pair.in_launch(x, rms, act="silu") is None  # a CPU tensor


def _weight(n: int, k: int):
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(torch.randn(n, k, dtype=torch.bfloat16) * 0.02, requires_grad=False, quant_type="nf4",
                             compress_statistics=True).cuda()


def _agree(got: torch.Tensor, want: torch.Tensor, what, equal: float) -> None:
    """The same bf16 output but where a sum in another order rounds the other way: within 2 units of bf16
    rounding everywhere, bit-equal in at least ``equal`` of the elements (an fp32 x Aᵀ differs in its last
    bits; one rounded to bf16 may differ by a unit, which moves every output of that adapter a little)."""
    err = (got.float() - want.float()).abs()
    assert (err <= 2 ** -7 * want.float().abs() + 1e-6).all(), (what, err.max().item())
    assert (got == want).float().mean() >= equal, (what, (got == want).float().mean().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("adapter,mid", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32-adapter", "bf16-adapter", "fp32-adapter-sums-half-way"])
def test_gpu_in_launch_equals_the_separate_launches(adapter, mid, monkeypatch):
    """q, k, v (1040, 272, 272 × 4096) with the RMSNorm; gate and up (1040 × 4096, SiLU) with the RMSNorm;
    down (1040 × 6144, a residual, k split across blocks among the settings): every "mma" setting for one row
    with the down-products (and norm) in its launch gives the outputs of lora_down then the plain launch (see
    :func:`_agree`); the counters are zero after each launch; and a CUDA graph of the three launches replays
    the eager outputs bit for bit with new inputs. ``mid``: the partials added half-way through the loop."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the mma kernel needs sm_80")
    from qfine.fast.gemv_rows import _sum_splits
    from qfine.fast.lora_down import lora_down
    from qfine.fast.mma_kernel import (
        DOWN_MID,
        DownProducts,
        candidates,
        fits,
        group_candidates,
        matmul_mma,
        matmul_mma_group,
        matmul_mma_silu,
        pair_candidates,
        precompile,
    )

    monkeypatch.setitem(DOWN_MID, "on", mid)  # every DownProducts below takes it
    torch.manual_seed(0)
    k, r = 4096, 16
    qkv = [(_weight(n, k), torch.randn(r, k, device="cuda", dtype=adapter) * 0.02,
            torch.randn(n, r, device="cuda", dtype=adapter) * 0.1, s) for n, s in ((1040, 2.0), (272, 0.5), (272, 1.0))]
    mlp = [(_weight(1040, k), torch.randn(r, k, device="cuda", dtype=adapter) * 0.02,
            torch.randn(1040, r, device="cuda", dtype=adapter) * 0.1, s) for s in (2.0, 0.5)]
    down = (_weight(1040, 6144), torch.randn(r, 6144, device="cuda", dtype=adapter) * 0.02,
            torch.randn(1040, r, device="cuda", dtype=adapter) * 0.1, 2.0)
    norm = (torch.rand(k, dtype=torch.bfloat16, device="cuda") + 0.5, 1e-5)
    sync = torch.zeros(3, dtype=torch.int32, device="cuda")
    h = torch.randn(1, k, dtype=torch.bfloat16, device="cuda") * 3
    g = torch.randn(1, 6144, dtype=torch.bfloat16, device="cuda")
    res = torch.randn(1, 1040, dtype=torch.bfloat16, device="cuda")

    def placeholders(ws):
        return [(w, (torch.empty(1, r, dtype=adapter, device="cuda"), b, s)) for w, _a, b, s in ws]

    def members(ws, xas):
        return [(w, (xa, b, s)) for (w, _a, b, s), xa in zip(ws, xas)]

    kinds = {
        "qkv": (group_candidates(1), qkv, norm, lambda cfg, dn, ms: matmul_mma_group(h, ms, cfg, dn)),
        "mlp": (pair_candidates(1), mlp, norm, lambda cfg, dn, ms: [matmul_mma_silu(h, *ms, cfg, dn)]),
        "down": (candidates(1), [down], None,
                 lambda cfg, dn, ms: [matmul_mma(g, ms[0][0], ms[0][1], res, cfg, _sum_splits, dn)]),
    }
    ran = expected = 0
    for name, (settings, ws, rms, run) in kinds.items():
        x = g if name == "down" else h
        settings = [cfg for cfg in settings if fits(cfg, 1, x.shape[1], 64) and not set(cfg) & {"L2B", "BULK"}]
        expected += len(settings)
        dn = DownProducts([a for _w, a, _b, _s in ws], rms, sync)
        for with_down in (None, dn):  # side by side on the CPU's cores, with and without the down-products
            precompile(x, placeholders(ws), res if name == "down" else None, settings, name == "mlp", with_down)
        if rms is None:
            xas = lora_down(x, [a for _w, a, _b, _s in ws])
            xn = x
        else:
            xas, xn = lora_down(x, [a for _w, a, _b, _s in ws], norm=rms)
        for cfg in settings:
            separate = (matmul_mma_group(xn, members(ws, xas), cfg) if name == "qkv"
                        else [matmul_mma_silu(xn, *members(ws, xas), cfg)] if name == "mlp"
                        else [matmul_mma(xn, ws[0][0], members(ws, xas)[0][1], res, cfg, _sum_splits)])
            got = run(cfg, dn, placeholders(ws))
            for i, (y, want) in enumerate(zip(got, separate)):
                _agree(y, want, (name, cfg, i), 0.99 if adapter == torch.float32 else 0.5)
            assert sync.tolist() == [0, 0, 0], (name, cfg)
            ran += 1
    assert ran == expected >= 80, (ran, expected)

    def step():
        x = torch.empty_like(h)
        q = matmul_mma_group(h, placeholders(qkv), group_candidates(1)[0],
                             DownProducts([a for _w, a, _b, _s in qkv], norm, sync))[0]
        x[:, :1040] = q
        y = matmul_mma_silu(x, *placeholders(mlp), pair_candidates(1)[0],
                            DownProducts([a for _w, a, _b, _s in mlp], norm, torch.zeros_like(sync)))
        return y

    graph, out = torch.cuda.CUDAGraph(), {}
    step()
    with torch.cuda.graph(graph):
        out["y"] = step()
    for _ in range(2):
        h.copy_(torch.randn_like(h) * 3)
        want = step().clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out["y"], want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_in_launch_early_equals_plain(monkeypatch):
    """Programmatic dependent launches (sm_90 on): two rounds of a norm + 4-bit launch with its own
    down-products and residual, each reading the one before's output, eager and replayed from a CUDA graph
    with new inputs: the plain launches' bits (a read of x before the wait would see the previous input)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    from qfine.fast import mma_kernel
    from qfine.fast.gemv_rows import _sum_splits

    torch.manual_seed(0)
    w = _weight(4096, 4096)
    a = torch.randn(16, 4096, device="cuda") * 0.02
    b = torch.randn(4096, 16, device="cuda") * 0.1
    norm = (torch.rand(4096, dtype=torch.bfloat16, device="cuda") + 0.5, 1e-5)
    syncs = [torch.zeros(3, dtype=torch.int32, device="cuda") for _ in range(2)]
    h = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    cfg = next(c for c in mma_kernel.candidates(1) if mma_kernel.fits(c, 1, 4096, 64) and c["SPLIT"] == 1)
    xa = torch.empty(1, 16, device="cuda")

    def step():
        y = h
        for sync in syncs:
            y = mma_kernel.matmul_mma(y, w, (xa, b, 2.0), y, cfg, _sum_splits,
                                      mma_kernel.DownProducts([a], norm, sync))
        return y

    inputs = [torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda") * 3 for _ in range(4)]
    assert_early_launch_equals_plain(monkeypatch, step, h, inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_with_in_launch_down_products(save_tiny, tmp_path, monkeypatch):
    """bf16 Llama (hidden 1024, MLP 2048, 2 layers, NF4 + r=8 on all projections), "mma" settings recorded for
    its shapes, QFINE_DOWN_IN_LAUNCH on: every one-row step's q/k/v, gate/up and down launches compute their own
    norm and down-products (3 a layer, none apart), and sampled log-probs from the graphed engine agree
    with a forward over prompt + completion (bf16: within 0.1 nats, mean within 0.02)."""
    from qfine.fast import gemv_kernel, in_launch, lora_down
    from qfine.fast.mma_kernel import DOWN_IN_LAUNCH, candidates, pair_candidates
    from qfine.generation import engine

    model = lora_model(save_tiny(tmp_path / "m", hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                                 num_key_value_heads=2), device="cuda", compute_dtype="bf16").eval()
    mma = next(c for c in candidates(1) if c["WARPS"] == 4 and c["TILES"] == 1 and c["SPLIT"] == 1)
    pair = pair_candidates(1)[0]
    real = gemv_kernel.tune_cache.known

    def known(table, key, device):  # every shape of this model "measured" as the mma kernel
        got = real(table, key, device)
        return got if got is not None else [(0.0, pair if key[0] == "silu" else mma)]

    monkeypatch.setattr(in_launch.tune_cache, "known", known)
    monkeypatch.setitem(DOWN_IN_LAUNCH, "on", True)
    calls = {"served": 0, "apart": 0}
    for name in ("project", "project_group", "gated"):
        fn = getattr(in_launch, name)

        def counted(*a, _fn=fn, **kw):
            got = _fn(*a, **kw)
            calls["served"] += got is not None
            return got

        monkeypatch.setattr(in_launch, name, counted)
    real_down = lora_down.lora_down

    def apart(*a, **kw):
        calls["apart"] += 1
        return real_down(*a, **kw)

    monkeypatch.setattr(lora_down, "lora_down", apart)
    gen = torch.Generator(device="cuda").manual_seed(0)
    got = engine.generate_tokens(model, [PROMPT], 16, [], 0, temperature=1.0, logprobs=True, generator=gen)
    # the eager steps before the graph: 3 launches a layer with their own down-products, none apart
    assert calls["served"] >= 3 * 2 and calls["served"] % 6 == 0 and calls["apart"] == 0, calls
    with torch.no_grad():
        p, toks = PROMPT, got.tokens[0]
        logits = model(input_ids=torch.tensor([p + toks], device="cuda")).logits[0, len(p) - 1:-1].float()
        want = logits.log_softmax(-1).gather(1, torch.tensor(toks, device="cuda")[:, None])[:, 0]
    diffs = (torch.tensor(got.logprobs[0], device="cuda") - want).abs()
    assert diffs.max() < 0.1 and diffs.mean() < 0.02, diffs.tolist()

