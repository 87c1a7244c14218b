"""qfine's generation engine (static KV cache, batched prefill, graphed decode, 4-bit small-row kernel)
against transformers' ``generate`` and against the training forward, on tiny 4-bit models with a LoRA
adapter whose B is non-zero."""

from __future__ import annotations

import pytest
import torch

from helpers import lora_model
from qfine.generation import engine

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [11, 12], [300, 301, 302, 303], [9]]


def _reference(model, prompts, new, stop, pad):
    """transformers' greedy generate, one prompt at a time, cut after the first stop token."""
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=next(model.parameters()).device)
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=stop, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        seq = got[0, len(p):].tolist()
        out.append(seq[:next((i + 1 for i, t in enumerate(seq) if t == stop), len(seq))])
    return out


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("qwen2", {}), ("qwen3", {"head_dim": 16})])
def test_greedy_equals_transformers_generate(save_tiny, tmp_path, kind, extra):
    """Batched, left-padded prompts of four lengths: every row's greedy tokens equal transformers'
    generate on that prompt alone (fp32, NF4 base + adapter), and one stop id ends a row early."""
    model = lora_model(save_tiny(tmp_path / kind, kind, **extra)).eval()
    assert engine.unsupported_reason(model) is None
    with torch.no_grad():
        want = _reference(model, PROMPTS, 24, stop=-1, pad=0)
    got = engine.generate_tokens(model, PROMPTS, 24, stop_ids=[], pad_id=0)
    assert got.tokens == want
    assert len({tuple(t) for t in want}) == len(want)  # the rows differ: the batch is not one answer
    # a stop token that appears mid-way in row 0: the row ends there, and the others are unchanged
    stop = want[0][5]
    with torch.no_grad():
        want_stopped = _reference(model, PROMPTS, 24, stop=stop, pad=0)
    got = engine.generate_tokens(model, PROMPTS, 24, stop_ids=[stop], pad_id=0)
    assert got.tokens == want_stopped and len(got.tokens[0]) <= 6


def test_rollout_logprobs_equal_the_training_forward(save_tiny, tmp_path):
    """Sampled completions (temperature 0.7, top-p 0.9): the log-probability the engine reports for each
    token equals log_softmax(logits / T) of a training-mode forward over prompt + completion (fp32, 1e-5)."""
    model = lora_model(save_tiny(tmp_path / "m")).train()
    gen = torch.Generator().manual_seed(3)
    got = engine.generate_tokens(model, PROMPTS, 16, stop_ids=[], pad_id=0, temperature=0.7, top_p=0.9,
                                 logprobs=True, generator=gen)
    assert model.training  # the mode is restored
    for p, toks, lps in zip(PROMPTS, got.tokens, got.logprobs):
        assert len(toks) == len(lps) == 16
        ids = torch.tensor([p + toks])
        logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float() / 0.7
        want = logits.log_softmax(-1).gather(1, torch.tensor(toks)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lps), want, atol=1e-5, rtol=0), (lps, want.tolist())


def test_sampling_follows_the_generator_and_top_p(save_tiny, tmp_path):
    """The same generator seed gives the same completions, another seed others; top-p keeps exactly the
    most likely tokens whose probability reaches p, as transformers' TopPLogitsWarper does."""
    from transformers.generation.logits_process import TopPLogitsWarper

    model = lora_model(save_tiny(tmp_path / "m")).eval()

    def draw(seed):
        return engine.generate_tokens(model, PROMPTS, 12, [], 0, temperature=1.0,
                                      generator=torch.Generator().manual_seed(seed)).tokens

    assert draw(1) == draw(1) and draw(1) != draw(2)
    logits = torch.randn(3, 50) * 3
    kept = TopPLogitsWarper(0.8)(None, logits.clone()) > float("-inf")
    for _ in range(200):
        tok = engine._choose(logits, 1.0, 0.8, 0, None)
        assert kept.gather(1, tok[:, None]).all()
    assert kept.sum(1).min() >= 1 and (kept.sum(1) < 50).all()


def test_the_adapter_is_read_live(save_tiny, tmp_path):
    """Changing B in place (as an optimizer step does) changes the next generation without a new cache;
    switching the adapter off gives the base's tokens."""
    model = lora_model(save_tiny(tmp_path / "m")).eval()
    before = engine.generate_tokens(model, PROMPTS, 12, [], 0).tokens
    decoders = dict(engine._DECODERS[model])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-3.0)
    after = engine.generate_tokens(model, PROMPTS, 12, [], 0).tokens
    assert after != before and dict(engine._DECODERS[model]) == decoders
    with model.disable_adapter(), torch.no_grad():
        base = engine.generate_tokens(model, PROMPTS, 12, [], 0).tokens
        assert base == _reference(model, PROMPTS, 12, stop=-1, pad=0)
    assert base != after


def test_unsupported_models_are_named(save_tiny, tmp_path):
    """A family the engine does not compute, or sliding-window attention, is refused with its reason."""
    gemma = lora_model(save_tiny(tmp_path / "g", "gemma", head_dim=16))
    assert "gemma" in engine.unsupported_reason(gemma)
    mistral = lora_model(save_tiny(tmp_path / "s", "mistral", sliding_window=4))
    assert engine.unsupported_reason(mistral) == "sliding-window attention"


def test_qfine_generate_uses_the_engine_and_matches(tiny_dir, monkeypatch):
    """qfine's generate() on a chat prompt: the engine's reply equals transformers' (QFINE_GENERATE=
    transformers) on the tiny model, and the streamed pieces join to the same text."""
    from qfine import ModelConfig, load_model
    from qfine.generation.generate import generate, stream, uses_engine

    loaded = load_model(ModelConfig(source=str(tiny_dir), quantization="nf4", compute_dtype="fp32", device="cpu"))
    loaded.model.eval()
    assert uses_engine(loaded.model)
    fast = generate(loaded, "What day was I born?", max_new_tokens=20)
    pieces = "".join(stream(loaded, [{"role": "user", "content": "What day was I born?"}], max_new_tokens=20))
    monkeypatch.setenv("QFINE_GENERATE", "transformers")
    assert not uses_engine(loaded.model)
    assert generate(loaded, "What day was I born?", max_new_tokens=20) == fast == pieces
    assert len(fast) > 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 64])
def test_gpu_4bit_kernel_equals_dequantize_then_matmul(rows, monkeypatch):
    """matmul_4bit against bitsandbytes' dequantization then a bf16 matmul, NF4 and FP4, double
    quantization on and off, k a multiple of 64 but not of 128, with and without an adapter's product:
    within bf16 rounding of the output; the "mma" settings up to 64 rows (QFINE_MMA_ROWS=64) among them."""
    import bitsandbytes as bnb

    from qfine.fast.gemv_kernel import candidates, launch_config, matmul_4bit, usable
    from qfine.fast.mma_kernel import ROWS, precompile

    monkeypatch.setitem(ROWS, "max", 64)
    torch.manual_seed(0)
    for n, k, qt, nested in [(4096, 4096, "nf4", True), (1000, 576, "nf4", False), (512, 1536, "fp4", True)]:
        w = bnb.nn.Params4bit(torch.randn(n, k, dtype=torch.bfloat16) * 0.02, requires_grad=False, quant_type=qt,
                              compress_statistics=nested).cuda()
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        assert usable(w, x)
        want = x.float() @ bnb.functional.dequantize_4bit(w.data, w.quant_state).float().t()
        settings = candidates(rows, n, k) + [launch_config(rows, n, k, 132), None]
        # with an adapter's product (r = 16 and r = 8) added in fp32
        adapters = {r: (torch.randn(rows, r, device="cuda"), torch.randn(n, r, device="cuda") * 0.5) for r in (16, 8)}
        mma = [cfg for cfg in settings if cfg and cfg.get("KERNEL") == "mma"]
        for lora in (None, (*adapters[16], 2.0)):  # compiled on the CPU's cores, side by side
            precompile(x, [(w, lora)], None, mma)
        kinds = set()
        # every launch setting the kernel may be given or may choose; r = 8 (another compile of each) with
        # the first setting of each kernel
        for cfg in settings:
            got = matmul_4bit(x, w, config=cfg).float()
            err = (got - want).abs().max() / want.abs().max()
            assert err < 8e-3, (n, k, qt, nested, cfg, err.item())
            kind = None if cfg is None else cfg.get("KERNEL", tuple(sorted(cfg)))
            for r in (16, 8) if kind not in kinds else (16,):
                kinds.add(kind)
                xa, b = adapters[r]
                both = matmul_4bit(x, w, (xa, b, 2.0), config=cfg).float()
                want_both = want + 2.0 * xa @ b.t()
                assert ((both - want_both).abs().max() / want_both.abs().max()) < 8e-3, (n, k, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graphed_decode_agrees_with_generate(save_tiny, tmp_path):
    """On the GPU, fp32 tiny model, NF4 base + adapter: the CUDA-graphed engine's greedy tokens equal
    transformers' generate, and the graph is captured once for two calls of the same shape."""
    model = lora_model(save_tiny(tmp_path / "m"), device="cuda").eval()
    with torch.no_grad():
        want = _reference(model, PROMPTS, 24, stop=-1, pad=0)
    assert engine.generate_tokens(model, PROMPTS, 24, [], 0).tokens == want
    (dec,) = engine._DECODERS[model].values()
    assert dec.graph is not None
    graph = dec.graph
    assert engine.generate_tokens(model, PROMPTS, 24, [], 0).tokens == want
    assert dec.graph is graph


def _counting(monkeypatch):
    """Counts of calls to the 4-bit kernel, the fused LoRA down-products (``normed``: those with the RMSNorm in
    their launch) and the grouped 4-bit launch (q, k, v or gate, up in one) while the test runs."""
    from qfine.fast import gemv_kernel
    from qfine.fast import lora_down as down

    calls = {"matmul_4bit": 0, "lora_down": 0, "matmul_group": 0, "normed": 0}
    for module, name in ((gemv_kernel, "matmul_4bit"), (down, "lora_down"), (gemv_kernel, "matmul_group")):
        real = getattr(module, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            calls["normed"] += kw.get("norm") is not None
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.skipif(not engine._INTERPRETED,
                    reason="runs the Triton kernels on the CPU: TRITON_INTERPRET=1 with triton")
def test_kernel_path_greedy_equals_generate_interpreted(save_tiny, tmp_path, monkeypatch):
    """Under Triton's CPU interpreter, fp32: the engine's forward through the 4-bit kernel (residual
    epilogue; for one row, the fused LoRA down-products and q, k, v and gate, up each in one grouped launch)
    gives transformers' greedy tokens on every row of a batch, and for a single prompt."""
    model = lora_model(save_tiny(tmp_path / "m", intermediate_size=192)).eval()
    with torch.no_grad():
        want = _reference(model, PROMPTS, 12, stop=-1, pad=0)
    calls = _counting(monkeypatch)
    assert engine.generate_tokens(model, PROMPTS, 12, [], 0, graph=False).tokens == want
    # 7 projections of 2 layers per forward: the prefill's 28 rows and 11 decode steps of 4 rows
    assert calls["matmul_4bit"] == 12 * 14 and calls["lora_down"] == calls["matmul_group"] == 0
    assert engine.generate_tokens(model, PROMPTS[:1], 12, [], 0, graph=False).tokens == want[:1]
    # one-row steps: 3 fused down-product launches per layer (2 with the norm before them; o's comes from the
    # attention's launch), and 4 launches of the 4-bit kernel (q, k, v grouped; o; gate, up grouped; down)
    assert calls["lora_down"] == 11 * 2 * 3 and calls["matmul_group"] == 11 * 2 * 2
    assert calls["normed"] == 11 * 2 * 2
    assert calls["matmul_4bit"] == 12 * 14 + 7 * 2 + 11 * 2 * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_kernel_path_logprobs_match_the_forward(save_tiny, tmp_path, monkeypatch):
    """On the GPU in bf16 (where the 4-bit kernel serves the decode step): sampled completions' log-probs
    from the graphed engine, for a batch of four and for one prompt, agree with a forward over prompt +
    completion on the same tokens (bf16: within 0.1 nats, mean within 0.02), and the kernel and the fused
    down-products were used."""
    model = lora_model(save_tiny(tmp_path / "m", intermediate_size=192), device="cuda", compute_dtype="bf16").eval()
    calls = _counting(monkeypatch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    got = engine.generate_tokens(model, PROMPTS, 16, [], 0, temperature=1.0, logprobs=True, generator=gen)
    one = engine.generate_tokens(model, PROMPTS[:1], 16, [], 0, temperature=1.0, logprobs=True, generator=gen)
    assert calls["matmul_4bit"] > 0 and calls["lora_down"] > 0  # one-row steps fuse the down-products
    diffs = []
    with torch.no_grad():
        for p, toks, lps in zip(PROMPTS + PROMPTS[:1], got.tokens + one.tokens, got.logprobs + one.logprobs):
            ids = torch.tensor([p + toks], device="cuda")
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()
            want = logits.log_softmax(-1).gather(1, torch.tensor(toks, device="cuda")[:, None])[:, 0]
            diffs.append((torch.tensor(lps, device="cuda") - want).abs())
    diffs = torch.cat(diffs)
    assert diffs.max() < 0.1 and diffs.mean() < 0.02, diffs.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("rows", [1, 16])
def test_gpu_kernels_at_8b_shapes(n, k, rows):
    """At the Llama-3.1-8B projection shapes (the launch settings a decode step uses there: k splits,
    column tiles of 16 and 32): the fused LoRA down-products of three adapters equal x Aᵀ (fp32); the
    4-bit product with the adapter's term read from one of those column views is within bf16 rounding of
    dequantize-then-matmul; and with a residual it equals round(residual + that product) exactly."""
    import bitsandbytes as bnb

    from qfine.fast.gemv_kernel import matmul_4bit
    from qfine.fast.lora_down import lora_down

    torch.manual_seed(0)
    w = bnb.nn.Params4bit(torch.randn(n, k, dtype=torch.bfloat16) * 0.02, requires_grad=False, quant_type="nf4",
                          compress_statistics=True).cuda()
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    mats = [torch.randn(16, k, device="cuda") * 0.02 for _ in range(3)]
    views = lora_down(x, mats)
    for a, got in zip(mats, views):
        want = x.float() @ a.t()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    b = torch.randn(n, 16, device="cuda") * 0.1
    y = matmul_4bit(x, w, (views[1], b, 2.0))
    want = x.float() @ bnb.functional.dequantize_4bit(w.data, w.quant_state).float().t() + 2.0 * views[1] @ b.t()
    assert ((y.float() - want).abs().max() / want.abs().max()) < 8e-3
    res = torch.randn(rows, n, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(matmul_4bit(x, w, (views[1], b, 2.0), residual=res), (res.float() + y.float()).to(res.dtype))
