"""The fast path on CUDA in bf16 against the plain peft path, and its compiled kernels against eager.

Tolerances (bf16 operands, fp32 accumulation; the two paths round in different places, so they are
compared as two bf16 computations of the same function, not bit for bit):
  * compiled elementwise kernels vs their eager fp32 reference: rel. error < 1e-2 (bf16 output rounding);
  * one training step against the same step in fp32: loss within 5e-3; all LoRA gradients together
    no further from fp32 than the reference bf16 path's (≤ 1.25× its error + 1e-3), and no single
    gradient tensor more than 2× the reference's error + 5e-3;
  * 50 AdamW steps on the same data and seed: every step's loss within 1% of the reference path.
Marked ``gpu``; skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from helpers import lora_model
from qfine.fast import FastDecoderLayer, apply_fast_path, ops
from qfine.fast.loss import linear_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


def _model(save_tiny, tmp_path, kind="llama", quantization="nf4"):
    return lora_model(save_tiny(tmp_path / kind, kind, **SHAPE), quantization, device="cuda", compute_dtype="bf16")


def _batches(n, bsz=4, seq=256, vocab=SHAPE["vocab_size"]):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randint(0, vocab, (bsz, seq), device="cuda", generator=g) for _ in range(n)]


def _step(model, ids, cache=True):
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):  # no cache under graph capture
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def test_compiled_kernels_match_eager_reference():
    torch.manual_seed(0)
    h = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    x, rstd = ops.rms_norm(h, w, 1e-5)
    xr, rr = ops.rms_norm.reference(h.float(), w.float(), 1e-5)
    assert _rel(x, xr) < 1e-2 and _rel(rstd, rr) < 1e-5
    dx = torch.randn_like(h)
    assert _rel(ops.rms_norm_backward(dx, h, w, rstd), ops.rms_norm_backward.reference(dx.float(), h.float(),
                                                                                     w.float(), rr)) < 1e-2
    gu, da = torch.randn(600, 2800, device="cuda", dtype=torch.bfloat16), torch.randn(600, 1400, device="cuda",
                                                                                    dtype=torch.bfloat16)
    for act in ("silu", "gelu_tanh"):
        assert _rel(ops.gated_act(gu, act), ops.gated_act.reference(gu.float(), act)) < 1e-2
        got, ref = ops.gated_act_backward(da, gu, act), ops.gated_act_backward.reference(da.float(), gu.float(), act)
        assert len(got) == 2 and got[0].shape == gu.shape
        assert max(_rel(a, b) for a, b in zip(got, ref)) < 1e-2
    # Gemma's (1 + w) norm
    x, rstd = ops.rms_norm(h, w, 1e-5, 1.0)
    xr, rr = ops.rms_norm.reference(h.float(), w.float(), 1e-5, 1.0)
    assert _rel(x, xr) < 1e-2 and _rel(ops.rms_norm_backward(dx, h, w, rstd, 1.0),
                                        ops.rms_norm_backward.reference(dx.float(), h.float(), w.float(), rr, 1.0)) < 1e-2
    qkv = torch.randn(2, 300, 12, 64, device="cuda", dtype=torch.bfloat16)  # 8 query + 2 + 2 kv heads
    ang = torch.randn(2, 300, 32, device="cuda")
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    got = ops.rope_qkv(qkv, cos.bfloat16(), sin.bfloat16(), 8, 2)
    ref = ops.rope_qkv.reference(qkv.float(), cos, sin, 8, 2)
    assert max(_rel(a, b) for a, b in zip(got, ref)) < 1e-2
    grads = [t.float().neg() for t in ref]
    assert _rel(ops.rope_qkv_backward(*[g.bfloat16() for g in grads], cos.bfloat16(), sin.bfloat16()),
                ops.rope_qkv_backward.reference(*grads, cos, sin)) < 1e-2
    # Qwen3: per-head q/k norms before RoPE
    qw, kw = 1 + 0.3 * torch.randn(64, device="cuda"), 1 + 0.3 * torch.randn(64, device="cuda")
    got = ops.qk_norm_rope_qkv(qkv, qw.bfloat16(), kw.bfloat16(), 1e-6, 0.0, cos.bfloat16(), sin.bfloat16(), 8, 2)
    ref = ops.qk_norm_rope_qkv.reference(qkv.float(), qw, kw, 1e-6, 0.0, cos, sin, 8, 2)
    assert max(_rel(a, b) for a, b in zip(got, ref)) < 1e-2
    assert _rel(ops.qk_norm_rope_qkv_backward(*[g.bfloat16() for g in grads], qkv, qw.bfloat16(), kw.bfloat16(),
                                              1e-6, 0.0, cos.bfloat16(), sin.bfloat16()),
                ops.qk_norm_rope_qkv_backward.reference(*grads, qkv.float(), qw, kw, 1e-6, 0.0, cos, sin)) < 1e-2
    # chunked loss from bf16 hidden states vs full fp32 logits
    hid = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = (torch.randn(5000, 512, device="cuda") * 0.05).bfloat16()
    labels = torch.randint(0, 5000, (2, 300), device="cuda")
    loss = linear_cross_entropy(hid, head, labels)
    (g_fast,) = torch.autograd.grad(loss, hid)
    hf = hid.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy((hf @ head.float().t())[:, :-1].reshape(-1, 5000),
                                            labels[:, 1:].reshape(-1))
    (g_ref,) = torch.autograd.grad(ref, hf)
    assert _rel(loss, ref) < 1e-3 and _rel(g_fast, g_ref) < 2e-2


def test_resident_weights_give_the_same_step(save_tiny, tmp_path):
    """Two layers of three kept dequantized (Triton NF4 into the folded layout, CUDA): the same loss and
    LoRA gradients as dequantizing every time (same values, same GEMM shapes: equal up to cuBLAS's
    choice of kernel; a stale or misplaced kept buffer is off by far more)."""
    from qfine.fast import keep_dequantized, release_dequantized

    model = _model(save_tiny, tmp_path)
    apply_fast_path(model)
    (ids,) = _batches(1)

    def step():
        model.zero_grad(set_to_none=True)
        loss = _step(model, ids)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh_loss, fresh = step()
    per_layer = keep_dequantized(model, 100.0, torch.bfloat16)[1] / 3
    release_dequantized(model)
    assert keep_dequantized(model, 2.5 * per_layer, torch.bfloat16)[0] == 2
    kept_loss, kept = step()
    release_dequantized(model)
    print(f"[resident] bit-identical loss: {torch.equal(kept_loss, fresh_loss)}, gradients: "
          f"{all(torch.equal(kept[n], g) for n, g in fresh.items())}")
    torch.testing.assert_close(kept_loss, fresh_loss, rtol=1e-4, atol=0)
    for n, g in fresh.items():
        torch.testing.assert_close(kept[n], g, rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind,quantization", [("llama", "nf4"), ("qwen2", "nf4"), ("qwen3", "nf4"), ("gemma", "nf4"),
                                               ("llama", "int4")])
def test_fast_step_matches_reference_bf16(save_tiny, tmp_path, kind, quantization):
    """Both bf16 paths against the same step computed in fp32 (fp32 dequantization, no autocast): the
    fast path may round in other places than the reference, but must not be further from fp32.
    Qwen3 (q/k norms) and Gemma ((1 + w) norms, GeGLU) run with head_dim 32 and random norm weights;
    int4 is QA-LoRA (the Triton INT4 dequantize and the pooled A inside the fused layers)."""
    extra = {"head_dim": 32} if kind in ("qwen3", "gemma") else {}
    folder = save_tiny(tmp_path / kind, kind, **SHAPE, **extra)
    if kind in ("qwen3", "gemma"):
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(folder)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for n, p in plain.named_parameters():
                if "norm" in n:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        plain.save_pretrained(folder)
    (ids,) = _batches(1)
    exact = lora_model(folder, quantization, device="cuda", compute_dtype="fp32")
    exact.float()  # embeddings, norms and head too: every operand in fp32
    exact_loss = exact(input_ids=ids, labels=ids).loss
    exact_loss.backward()
    truth = {n: p.grad for n, p in exact.named_parameters() if p.requires_grad}
    model = lora_model(folder, quantization, device="cuda", compute_dtype="bf16")
    ref_loss = _step(model, ids)
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    report = apply_fast_path(model)
    assert report.layers == report.fused == SHAPE["num_hidden_layers"] and report.fused_loss, str(report)
    assert all(isinstance(m, FastDecoderLayer) for m in model.get_base_model().model.layers)
    fast_loss = _step(model, ids)
    fast = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    flat = lambda g: torch.cat([g[n].flatten().double() for n in truth])  # noqa: E731
    err_ref, err_fast = _rel(flat(ref), flat(truth)), _rel(flat(fast), flat(truth))
    per_tensor = max(_rel(fast[n], truth[n]) - 2 * _rel(ref[n], truth[n]) for n in truth)
    print(f"{kind}: loss fp32 {float(exact_loss):.5f}, reference {float(ref_loss):.5f}, fast {float(fast_loss):.5f}; "
          f"LoRA grads vs fp32: reference {err_ref:.2e}, fast {err_fast:.2e}")
    assert _rel(fast_loss, exact_loss) < 5e-3 and _rel(ref_loss, exact_loss) < 5e-3
    assert err_fast < 1.25 * err_ref + 1e-3, (err_fast, err_ref)
    assert per_tensor < 5e-3, per_tensor


def test_fifty_steps_loss_curve_within_one_percent(save_tiny, tmp_path):
    data = _batches(5)
    curves = {}
    for fast in (False, True):
        model = _model(save_tiny, tmp_path / str(fast))
        if fast:
            assert apply_fast_path(model).layers
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for step in range(50):
            losses.append(float(_step(model, data[step % len(data)])))
            opt.step()
            opt.zero_grad(set_to_none=True)
        curves[fast] = losses
    ref, got = curves[False], curves[True]
    worst = max(abs(a - b) / b for a, b in zip(got, ref))
    print(f"50 steps: loss {ref[0]:.4f} → {ref[-1]:.4f} (reference), {got[0]:.4f} → {got[-1]:.4f} (fast); "
          f"worst step rel. diff {worst:.2e}")
    assert ref[-1] < 0.8 * ref[0]  # it learned something, so the comparison means something
    assert worst < 0.01, (worst, ref[::10], got[::10])


def test_offloaded_checkpointing_same_grads_less_memory(save_tiny, tmp_path):
    """Fast path + checkpointing with the layer inputs in pinned host memory: the gradients of the plain
    fast step (bf16 recompute: rel. 1e-2), and a peak lower than on-GPU checkpointing by most of the
    layers' inputs (eight on the GPU vs at most two fetched back, plus the recompute's own input gradient)."""
    from qfine.fast import offload_checkpoints

    shape = {**SHAPE, "num_hidden_layers": 8}
    (ids,) = _batches(1, bsz=4, seq=1024)
    grads, peaks = {}, {}
    for mode in ("plain", "ckpt", "offload"):
        model = lora_model(save_tiny(tmp_path / mode, "llama", **shape), "nf4", device="cuda", compute_dtype="bf16")
        if mode != "plain":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        apply_fast_path(model)
        if mode == "offload":
            assert offload_checkpoints(model) == 8
        _step(model, ids)  # compile + warm the allocator
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(model, ids)
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        grads[mode] = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
        del model
    layer_input = ids.numel() * shape["hidden_size"] * 2
    print(f"peak above resident: plain {peaks['plain'] / 2**20:.1f} MiB, ckpt {peaks['ckpt'] / 2**20:.1f} MiB, "
          f"offload {peaks['offload'] / 2**20:.1f} MiB (one layer input {layer_input / 2**20:.1f} MiB); "
          f"grad rel. diff ckpt {_rel(grads['ckpt'], grads['plain']):.2e}, offload "
          f"{_rel(grads['offload'], grads['plain']):.2e}")
    assert _rel(grads["offload"], grads["plain"]) < 1e-2
    assert peaks["ckpt"] - peaks["offload"] >= 4 * layer_input


@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_nf4_dequantize_matches_bitsandbytes(double_quant):
    """The one-launch kernel against bitsandbytes' dequantize_4bit on a Llama-3-8B MLP shape: the same
    values (both compute in fp32 and round once; at most one bf16 rounding step apart where the
    compiler contracts a multiply-add), and its bandwidth next to bitsandbytes'."""
    import bitsandbytes.functional as F

    from qfine.fast.nf4_kernel import dequantize_nf4

    torch.manual_seed(0)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)
    ref = F.dequantize_4bit(packed, state)
    got = dequantize_nf4(packed, state)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    same = (got == ref).float().mean().item()
    ulp = (ref.float().abs() * 2 ** -7).clamp_min(1e-30)
    assert bool(((got.float() - ref.float()).abs() <= ulp).all()) and same > 0.999, same
    out = torch.empty(2 * 14336, 4096, device="cuda", dtype=torch.bfloat16)
    dequantize_nf4(packed, state, out=out[14336:])  # a row block of a stacked buffer
    assert torch.equal(out[14336:], got)
    wide = torch.full((14336, 4096 + 48), 7.0, device="cuda", dtype=torch.bfloat16)
    dequantize_nf4(packed, state, out=wide[:, :4096])  # the leading columns of [W | B] (row stride 4144)
    assert torch.equal(wide[:, :4096], got) and bool((wide[:, 4096:] == 7.0).all())

    def timed(fn):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20 / 1e3

    moved = packed.numel() + w.numel() * 2  # bytes read + written
    t_ours, t_bnb = timed(lambda: dequantize_nf4(packed, state)), timed(lambda: F.dequantize_4bit(packed, state))
    copy = timed(lambda: w.clone())
    print(f"NF4 dequantize 14336x4096 (double quant {double_quant}): Triton {moved / t_ours / 1e9:,.0f} GB/s, "
          f"bitsandbytes {moved / t_bnb / 1e9:,.0f} GB/s, bf16 copy {2 * w.numel() * 2 / copy / 1e9:,.0f} GB/s; "
          f"{100 * same:.3f}% identical")


def test_triton_int4_dequantize_matches_the_reference():
    """QA-LoRA's INT4 kernel against qalora.dequantize_groups on a Llama-3-8B MLP shape, groups of 32:
    fp32 output equal to float rounding, bf16 at most one rounding step apart (a contracted
    multiply-add), row blocks and the leading columns of [W | B] written in place; its bandwidth."""
    from qfine.fast.int4_kernel import dequantize_int4
    from qfine.quant.int4 import dequantize_groups, quantize_groups

    torch.manual_seed(0)
    w = torch.randn(14336, 4096, device="cuda") * 0.02
    codes, d, m = quantize_groups(w, 32)
    ref = dequantize_groups(codes, d, m)
    got32 = dequantize_int4(codes, d, m, torch.float32)
    torch.testing.assert_close(got32, ref, rtol=1e-6, atol=1e-7)
    got = dequantize_int4(codes, d, m, torch.bfloat16)
    ref16 = ref.to(torch.bfloat16)
    same = (got == ref16).float().mean().item()
    # one bf16 rounding (half a step, ≤ |x|·2⁻⁸) of a value whose fp32 computation may differ by the
    # rounding of d·q + m (a contracted multiply-add), which is relative to |m| + 15 d, not to x
    span = (m.abs() + 15 * d).repeat_interleave(32, dim=1)
    tol = ref.abs() * 2 ** -8 + span * 2 ** -22
    assert bool(((got.float() - ref).abs() <= tol).all()) and same > 0.999, same
    out = torch.empty(2 * 14336, 4096, device="cuda", dtype=torch.bfloat16)
    dequantize_int4(codes, d, m, torch.bfloat16, out=out[14336:])
    assert torch.equal(out[14336:], got)
    wide = torch.full((14336, 4096 + 48), 7.0, device="cuda", dtype=torch.bfloat16)
    dequantize_int4(codes, d, m, torch.bfloat16, out=wide[:, :4096])
    assert torch.equal(wide[:, :4096], got) and bool((wide[:, 4096:] == 7.0).all())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        dequantize_int4(codes, d, m, torch.bfloat16, out=out[:14336])
    start.record()
    for _ in range(20):
        dequantize_int4(codes, d, m, torch.bfloat16, out=out[:14336])
    end.record()
    torch.cuda.synchronize()
    t = start.elapsed_time(end) / 20 / 1e3
    moved = codes.numel() + 2 * d.numel() * 4 + w.numel() * 2
    print(f"INT4-g32 dequantize 14336x4096: Triton {moved / t / 1e9:,.0f} GB/s ({t * 1e6:.0f} us); "
          f"{100 * same:.3f}% identical to the reference in bf16")


@pytest.mark.parametrize("mode,seqs", [("plain", (512,)), ("ckpt", (512,)), ("offload", (512,)),
                                       ("plain", (512, 512, 256, 512, 384, 256, 384, 512))])
def test_cuda_graph_step_equals_eager_step(save_tiny, tmp_path, mode, seqs):
    """Forward+backward replayed as a CUDA graph (qfine.fast.graphs) trains exactly like the eager step:
    micro-batches with gradient accumulation over two (so replays add into the bound gradients and
    zero_grad(set_to_none=True) detaches them), AdamW after each pair; every loss and the final LoRA weights
    agree with the eager run to bf16-kernel determinism (rel. 1e-3; printed). With several sequence lengths,
    the shapes after the first are captured at first sight (no eager warm-up)."""
    from qfine.fast import offload_checkpoints
    from qfine.fast.graphs import GraphedStep

    shape = {**SHAPE, "num_hidden_layers": 4}
    batches = _batches(3, bsz=2, seq=512)
    data = [batches[i % 3][:, :seqs[i % len(seqs)]] for i in range(max(6, len(seqs)))]
    path = save_tiny(tmp_path / "m", "llama", **shape)
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = lora_model(path, "nf4", device="cuda", compute_dtype="bf16")
        if mode != "plain":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        assert apply_fast_path(model).layers == 4
        if mode == "offload":
            assert offload_checkpoints(model) == 4
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        step = GraphedStep(lambda input_ids: _step(model, input_ids, cache=False), params, warmup=1, model=model,
                           enabled=graphed)
        losses = []
        for i, ids in enumerate(data):
            losses.append(float(step(input_ids=ids)))
            if i % 2:
                opt.step()
                opt.zero_grad(set_to_none=True)
        runs[graphed] = (losses, torch.cat([p.detach().flatten().float() for p in params]), step)
    (l_eager, w_eager, _), (l_graph, w_graph, step) = runs[False], runs[True]
    eager = ops.eager_in_capture()
    print(f"{mode} {seqs}: reserved while capturing "
          f"{', '.join(f'{r / 2**20:.1f}' for r in step.capture_reserved)} MiB; {step.summary()}; "
          f"kernels recorded eagerly in the capture: {eager or 'none'}")
    for f in ops._FUSED:
        if f.capture_error:
            print(f"{f.__name__} in capture: {f.capture_error[:3000]}")
    assert step.reason is None and step.graphs == len(set(seqs))
    assert step.replays == len(data) - 1  # all but the single warm-up step
    worst = max(abs(a - b) / abs(b) for a, b in zip(l_graph, l_eager))
    print(f"{mode}: losses eager {l_eager[0]:.5f}…{l_eager[-1]:.5f}, graph {l_graph[0]:.5f}…{l_graph[-1]:.5f}, "
          f"worst loss rel. diff {worst:.2e}, weights rel. diff {_rel(w_graph, w_eager):.2e}")
    assert l_eager[-1] < l_eager[0]
    assert worst < 1e-3 and _rel(w_graph, w_eager) < 1e-3


@pytest.mark.parametrize("packing", [False, True])
def test_qfine_train_with_cuda_graphs_matches_eager(tiny_dir, tmp_path, capsys, packing):
    """`qfine train` with its CUDA-graph step (the default) against TRL's eager step, rows of many lengths
    (so several padded shapes): the graphs serve most micro-batches, the first step's loss (same weights,
    same batch) agrees to 1e-3, the last to 1.5% and every logged loss to 3%. The later bounds are loose
    because TRL's eager step alone is not reproducible at this learning rate: two eager runs of the same
    code (H100) ended at 5.2170 and 5.2336, and graph-vs-eager worst steps measured 0.8–2.0%."""
    import json

    from helpers import FACT, tiny_config, write_jsonl
    from qfine.training import train

    rows = [{"messages": [FACT[0], {"role": "assistant", "content": "It was a day " + "and a night " * (i % 23)}]}
            for i in range(24)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    losses, out = {}, {}
    for graphs in (False, True):
        cfg = tiny_config(tiny_dir, data, tmp_path / f"run{graphs}", cuda_graphs=graphs, max_steps=24, grad_accum=2,
                          report_samples=0, learning_rate=3e-3)
        cfg.data.max_seq_len, cfg.data.packing = 256, packing
        run = train(cfg)
        out[graphs] = capsys.readouterr().out
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[graphs] = [r["loss"] for r in rows if "loss" in r]
    print(out[True])
    assert "CUDA graphs on" in out[True] and "CUDA graphs" not in out[False]
    summary = next(line for line in out[True].splitlines() if "steps replayed" in line)
    replayed, calls = (int(w) for w in summary.split("CUDA graphs: ")[1].split(" steps")[0].split(" of "))
    assert calls == 48 and replayed >= 24 and "failed" not in summary, summary
    worst = max(abs(a - b) / b for a, b in zip(losses[True], losses[False]))
    print(f"packing={packing}: losses eager {losses[False][0]:.4f}…{losses[False][-1]:.4f}, graphs "
          f"{losses[True][0]:.4f}…{losses[True][-1]:.4f}; worst step rel. diff {worst:.2e}")
    assert losses[True][-1] < 0.7 * losses[True][0]
    assert abs(losses[True][0] - losses[False][0]) < 1e-3 * losses[False][0]
    assert abs(losses[True][-1] - losses[False][-1]) < 1.5e-2 * losses[False][-1]
    assert worst < 3e-2


def test_cuda_graph_replays_draw_new_dropout_masks(save_tiny, tmp_path):
    """LoRA dropout 0.1 inside the fused layers, replayed as a CUDA graph: the step is captured (no
    module draws random numbers), every replay draws new seeds on the device (the same batch and
    weights give a new loss each time), and a replay's loss equals the eager step run with that
    replay's seeds (bf16 kernels, rel. 1e-3)."""
    from qfine.fast.graphs import GraphedStep

    path = save_tiny(tmp_path / "m", "llama", **SHAPE)
    model = lora_model(path, "nf4", device="cuda", compute_dtype="bf16", dropout=0.1)
    assert apply_fast_path(model).fused == SHAPE["num_hidden_layers"]
    params = [p for p in model.parameters() if p.requires_grad]
    step = GraphedStep(lambda input_ids: _step(model, input_ids, cache=False), params, warmup=1, model=model)
    assert step.reason is None, step.reason
    ids = _batches(1)[0]
    losses = []
    for _ in range(5):
        losses.append(float(step(input_ids=ids)))
        model.zero_grad(set_to_none=True)
    assert step.replays == 4 and len(set(losses[1:])) == 4, losses
    layers = model.get_base_model().model.layers
    seeds = [layer._qfine_seeds.clone() for layer in layers]
    for layer, s in zip(layers, seeds):
        layer._dropout_seeds = lambda projs, device, s=s: s  # the eager step with the last replay's masks
    eager = float(_step(model, ids, cache=False))
    print(f"replay losses {losses}; eager with the last replay's seeds {eager:.6f}")
    x = torch.randn(512, 704, device="cuda", dtype=torch.bfloat16)
    kept = ops.lora_dropout(x, seeds[0], 6, 0.1) != 0  # the compiled kernel's mask = the CPU hash's
    assert torch.equal(kept.cpu(), ops.keep_mask(seeds[0][6].cpu(), 512, 704, 0.1) & (x != 0).cpu())
    assert abs(eager - losses[-1]) <= 1e-3 * abs(losses[-1])
