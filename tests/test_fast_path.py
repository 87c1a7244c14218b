"""The fused fast path against the peft/transformers reference, on CPU in fp32.

The same model instance is run twice on the same batch: first through the reference layers, then
after :func:`apply_fast_path`. Loss and every LoRA gradient must agree to fp32 rounding; the swap
must leave state-dict keys, eval/generation outputs and saved adapters unchanged.
"""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_VOCAB as VOCAB
from helpers import lora_model
from qfine.fast import FastDecoderLayer, apply_fast_path, ops, unsupported_reason
from qfine.fast.loss import LinearCrossEntropy, linear_cross_entropy
from qfine.fast.swap import _PROJ


def _batch(bsz=2, seq=24):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (bsz, seq), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt that carries no loss
    return ids, labels


def _perturb_norms(model):
    """Random norm weights (checkpoints start them at 1, Gemma's at 0): a fused norm that ignored its
    weight, its (1 + w) offset or Qwen3's q/k norms would then change the loss."""
    g = torch.Generator().manual_seed(11)
    names = [n for n, p in model.named_parameters() if "norm" in n]
    assert names
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, out


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("kind,quantization,extra,targets", [
    ("llama", "nf4", {}, None),
    ("llama", "none", {}, None),
    ("qwen2", "nf4", {}, None),     # q/k/v biases in the base layers
    ("mistral", "fp4", {"sliding_window": 16}, None),
    # adapters on some projections only: k, o, gate and down run base-only inside the fused groups
    ("qwen2", "nf4", {}, ["q_proj", "v_proj", "up_proj"]),
    ("qwen3", "nf4", {"head_dim": 16}, None),  # per-head q/k RMSNorm before RoPE
    ("gemma", "nf4", {"head_dim": 16}, None),  # (1 + w) norms in fp32, GeGLU (tanh), scaled embedding
    ("gemma", "none", {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"}, None),
])
def test_fast_path_matches_reference(tmp_path, save_tiny, kind, quantization, extra, targets):
    model = lora_model(save_tiny(tmp_path / kind, kind, **extra), quantization, targets=targets)
    _perturb_norms(model)
    ids, labels = _batch()
    ref_loss, ref_grads, ref_out = _loss_and_grads(model, ids, labels)
    assert ref_out.logits is not None

    report = apply_fast_path(model)
    assert report.reason is None and report.layers == 2 and report.fused_loss, str(report)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(type(m).__name__) if isinstance(m, FastDecoderLayer) else None)
    try:
        fast_loss, fast_grads, fast_out = _loss_and_grads(model, ids, labels)
    finally:
        handle.remove()
    assert calls.count("FastDecoderLayer") == 2
    assert fast_out.logits is None  # the chunked loss never built them
    assert _rel(fast_loss, ref_loss) < 1e-5, (float(fast_loss), float(ref_loss))
    assert set(fast_grads) == set(ref_grads) and len(ref_grads) == 2 * len(targets or range(7)) * 2
    worst = max(_rel(fast_grads[n], ref_grads[n]) for n in ref_grads)
    assert worst < 1e-4, worst


def _count_nodes(loss, name):
    seen, stack, n = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        n += type(node).__name__ == name
        stack.extend(f for f, _ in node.next_functions)
    return n


def test_fast_path_with_gradient_checkpointing_and_grad_accumulation(tmp_path, save_tiny):
    model = lora_model(save_tiny(tmp_path / "m"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = _batch()
    ref = model(input_ids=ids, labels=labels, num_items_in_batch=100)
    ref.loss.backward()
    ref_g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    apply_fast_path(model)
    assert all(layer.gradient_checkpointing for layer in model.get_base_model().model.layers)
    fast = model(input_ids=ids, labels=labels, num_items_in_batch=100)
    assert _count_nodes(fast.loss, "OffloadedCheckpointBackward") == 2  # qfine's recompute, inputs kept on device
    fast.loss.backward()
    assert _rel(fast.loss, ref.loss) < 1e-5
    assert max(_rel(p.grad, ref_g[n]) for n, p in model.named_parameters() if p.requires_grad) < 1e-4


@pytest.mark.parametrize("fast,dropout", [(True, 0.0), (False, 0.1), (True, 0.1)])
def test_offloaded_checkpointing_matches_the_plain_backward(tmp_path, save_tiny, fast, dropout):
    """Layer inputs kept off the GPU and layers recomputed in the backward: same loss and grads as no
    checkpointing at all — with LoRA dropout too, which only holds if the recompute replays the RNG
    (peft's layers) or reuses the forward's seeds (the fused layers)."""
    from qfine.fast import offload_checkpoints

    model = lora_model(save_tiny(tmp_path / "m"), dropout=dropout)
    ids, labels = _batch()
    if fast:  # the reference is the fused layer without checkpointing (its masks are its own)
        assert apply_fast_path(model).fused == 2
    torch.manual_seed(5)
    ref_loss, ref_grads, _ = _loss_and_grads(model, ids, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if fast:
        assert apply_fast_path(model).layers == 2
    assert offload_checkpoints(model) == 2
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    assert _count_nodes(loss, "OffloadedCheckpointBackward") == 2
    loss.backward()
    assert _rel(loss, ref_loss) < 1e-6
    worst = max(_rel(p.grad, ref_grads[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert worst < 1e-5, worst


def test_swap_keeps_keys_eval_outputs_and_peft_adapter(tmp_path, save_tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = save_tiny(tmp_path / "m")
    model = lora_model(folder, quantization="none")
    ids, _ = _batch(1, 16)
    keys = list(model.state_dict())
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    apply_fast_path(model)
    assert apply_fast_path(model).layers == 2  # idempotent
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    with torch.no_grad():
        reloaded = plain.eval()(input_ids=ids).logits
    assert _rel(reloaded, after) < 1e-6


class _SeededDropout(torch.nn.Module):
    """peft's lora_dropout with the fused path's mask for a given seed (the reference for the fused dropout)."""

    def __init__(self, seeds, index, p):
        super().__init__()
        self.seeds, self.index, self.p = seeds, index, p

    def forward(self, x):
        return ops.lora_dropout(x.reshape(-1, x.shape[-1]), self.seeds, self.index, self.p).view_as(x)


def _saved_bytes(model, ids, labels):
    """Bytes autograd keeps for the backward of one training forward (what activation memory is)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    return total, loss


@pytest.mark.parametrize("kind,quantization", [("llama", "nf4"), ("qwen2", "none")])
def test_fused_lora_dropout_equals_peft_with_the_same_masks(tmp_path, save_tiny, kind, quantization):
    """LoRA dropout inside the fused layers: every layer stays fused, each projection has its own mask
    (one seed per projection, regenerated in the backward), loss and all LoRA gradients equal peft's
    reference layers run with the same masks, and nothing more is kept for the backward than with
    dropout 0 (the masks are never stored)."""
    model = lora_model(save_tiny(tmp_path / kind, kind), quantization, dropout=0.1)
    _perturb_norms(model)
    ids, labels = _batch()
    report = apply_fast_path(model)
    assert report.fused == 2 and "2 of 2 decoder layers fused; chunked" in str(report), str(report)
    torch.manual_seed(5)
    fast_loss, fast_grads, _ = _loss_and_grads(model, ids, labels)
    layers = model.get_base_model().model.layers
    seeds = [layer._qfine_seeds.clone() for layer in layers]
    assert len({int(v) for s_ in seeds for v in s_}) == 14  # 7 projections × 2 layers, each its own mask
    torch.manual_seed(6)
    other, _, _ = _loss_and_grads(model, ids, labels)
    assert float(other) != float(fast_loss)  # the masks really drop something

    dropped_bytes, _ = _saved_bytes(model, ids, labels)
    for layer, seed in zip(layers, seeds):
        for i, (parent, name) in enumerate(_PROJ):
            lora = getattr(getattr(layer, parent), name)
            lora.lora_dropout["default"] = _SeededDropout(seed, i, 0.1)
    assert str(apply_fast_path(model)).startswith("fast path on: 0 of 2 decoder layers fused; peft's reference "
                                                  "layer for 2 with LoRA dropout module _SeededDropout")
    ref_loss, ref_grads, _ = _loss_and_grads(model, ids, labels)
    assert _rel(fast_loss, ref_loss) < 1e-5, (float(fast_loss), float(ref_loss))
    worst = max(_rel(fast_grads[n], ref_grads[n]) for n in ref_grads)
    assert worst < 1e-4, worst

    plain = lora_model(save_tiny(tmp_path / f"{kind}0", kind), quantization, dropout=0.0)
    apply_fast_path(plain)
    plain_bytes, _ = _saved_bytes(plain, ids, labels)
    # + each layer's (7,) int64 seeds, saved by its 4 packs (one tensor, counted once per reference)
    assert plain_bytes <= dropped_bytes <= plain_bytes + 2 * 4 * 7 * 8, (plain_bytes, dropped_bytes)


def test_dropout_masks_are_independent_and_unbiased():
    """The hash mask: keep rate 1 − p, two seeds agree as independent masks do ((1−p)² + p²), rows and
    columns carry no pattern, and E[drop(x)] = x."""
    p, n = 0.1, 1000
    a = ops.keep_mask(torch.tensor(123), n, n, p)
    b = ops.keep_mask(torch.tensor(124), n, n, p)
    assert abs(1 - a.float().mean() - p) < 2e-3
    assert abs((a == b).float().mean() - ((1 - p) ** 2 + p ** 2)) < 2e-3
    assert abs(1 - a.float().mean(0) - p).max() < 0.05 and abs(1 - a.float().mean(1) - p).max() < 0.05
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[:, 0], a[:, 1])
    x = torch.full((n, n), 2.0)
    mean = torch.stack([ops.lora_dropout(x, torch.arange(8), s, p) for s in range(8)]).mean()
    assert abs(float(mean) - 2.0) < 0.01
    assert torch.equal(ops.keep_mask(torch.tensor(123), n, n, p), a)  # regenerated, not stored


def test_unsupported_models_are_named(tmp_path, save_tiny):
    model = lora_model(save_tiny(tmp_path / "g2", "gemma2", head_dim=16, hidden_activation="gelu_pytorch_tanh"))
    assert "'gemma2' is not one of" in unsupported_reason(model)
    assert apply_fast_path(model).reason is not None
    # a supported family whose layer grew a module the fused forward would skip is refused, by name
    llama = lora_model(save_tiny(tmp_path / "l", "llama"))
    llama.get_base_model().model.layers[0].add_module("extra_norm", torch.nn.LayerNorm(64))
    assert "extra_norm" in unsupported_reason(llama)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "'gpt2' is not one of" in unsupported_reason(gpt2)


def test_trainable_norms_run_the_reference_layer(tmp_path, save_tiny):
    """The fused backward returns no gradient for norm weights: a run that trains them must not fuse."""
    model = lora_model(save_tiny(tmp_path / "q3", "qwen3", head_dim=16))
    ids, labels = _batch()
    for n, p in model.named_parameters():
        if "q_norm" in n:
            p.requires_grad_(True)
    ref_loss, ref_grads, _ = _loss_and_grads(model, ids, labels)
    report = apply_fast_path(model)
    assert report.fused == 0 and "2 with trainable norm weights" in str(report)
    loss, grads, _ = _loss_and_grads(model, ids, labels)
    assert _rel(loss, ref_loss) < 1e-5
    name = next(n for n in ref_grads if "q_norm" in n)
    assert grads[name].abs().sum() > 0 and _rel(grads[name], ref_grads[name]) < 1e-4


def test_chunked_cross_entropy_matches_full_logits():
    torch.manual_seed(0)
    h = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 10))
    labels[0, :4] = -100
    logits = h @ w.t()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                            ignore_index=-100)
    (ref_g,) = torch.autograd.grad(ref, h)
    # chunk of 4 rows: the loss-bearing rows span several chunks and a ragged last one
    flat = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    n = int((flat != -100).sum())
    got = LinearCrossEntropy.apply(h.reshape(-1, 16), w, flat, float(n), 4)
    (got_g,) = torch.autograd.grad(got * 3.0, h)
    assert abs(float(got) - float(ref)) < 1e-12
    assert _rel(got_g, 3.0 * ref_g) < 1e-12
    assert float(linear_cross_entropy(h, w, labels)) == pytest.approx(float(ref), rel=1e-12)
    summed = linear_cross_entropy(h, w, labels, num_items_in_batch=7)
    assert float(summed) == pytest.approx(float(ref) * n / 7, rel=1e-12)


@pytest.mark.parametrize("name", ["rms_norm", "gemma_norm", "silu", "gelu_tanh", "gelu", "rope", "qk_norm_rope"])
def test_hand_written_backwards_match_autograd(name):
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    if name in ("rms_norm", "gemma_norm"):
        offset = 1.0 if name == "gemma_norm" else 0.0
        h, w = torch.randn(3, 5, 32, **f64, requires_grad=True), torch.randn(32, **f64)
        x, rstd = ops.rms_norm(h, w, 1e-6, offset)
        ref_x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (w + offset)
        assert _rel(x, ref_x) < 1e-14
        dx = torch.randn_like(x)
        (ref,) = torch.autograd.grad(x, h, dx)
        got = ops.rms_norm_backward(dx, h.detach(), w, rstd, offset)
        assert _rel(got, ref) < 1e-12
    elif name in ("silu", "gelu_tanh", "gelu"):
        from transformers.activations import ACT2FN

        hf_name = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[name]
        assert ops.GATED_ACTS[hf_name] == name
        gu = 2 * torch.randn(4, 80, **f64, requires_grad=True)
        a = ops.gated_act(gu, name)
        g, u = gu[:, :40], gu[:, 40:]
        assert _rel(a, ACT2FN[hf_name](g) * u) < 1e-15  # what the transformers MLP computes
        da = torch.randn_like(a)
        (ref,) = torch.autograd.grad(a, gu, da)
        dgu, act = ops.gated_act_backward(da, gu.detach(), name)
        assert _rel(dgu, ref) < 1e-12 and _rel(act, a) < 1e-15
    elif name == "qk_norm_rope":
        qkv = torch.randn(2, 6, 3 + 2 * 2, 8, **f64, requires_grad=True)
        qw, kw = torch.randn(8, **f64), torch.randn(8, **f64)
        ang = torch.randn(2, 6, 4, **f64)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        q, k, v = ops.qk_norm_rope_qkv(qkv, qw, kw, 1e-6, 0.0, cos, sin, 3, 2)
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

        qn, kn = Qwen3RMSNorm(8, 1e-6).double(), Qwen3RMSNorm(8, 1e-6).double()
        qn.weight.data.copy_(qw), kn.weight.data.copy_(kw)
        q_ref, k_ref = apply_rotary_pos_emb(qn(qkv[:, :, :3]).transpose(1, 2), kn(qkv[:, :, 3:5]).transpose(1, 2),
                                            cos, sin)
        # Qwen3RMSNorm takes its statistics in fp32 even for fp64 inputs, hence 1e-6
        assert _rel(q, q_ref.transpose(1, 2)) < 1e-6 and _rel(k, k_ref.transpose(1, 2)) < 1e-6
        grads = [torch.randn_like(t) for t in (q, k, v)]
        (ref,) = torch.autograd.grad((q, k, v), qkv, grads)
        got = ops.qk_norm_rope_qkv_backward(*grads, qkv.detach(), qw, kw, 1e-6, 0.0, cos, sin)
        assert _rel(got, ref) < 1e-12
    else:
        qkv = torch.randn(2, 6, 3 + 2 * 2, 8, **f64, requires_grad=True)  # 3 query heads, 2 kv heads
        ang = torch.randn(2, 6, 4, **f64)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        q, k, v = ops.rope_qkv(qkv, cos, sin, 3, 2)
        grads = [torch.randn_like(t) for t in (q, k, v)]
        (ref,) = torch.autograd.grad((q, k, v), qkv, grads)
        assert _rel(ops.rope_qkv_backward(*grads, cos, sin), ref) < 1e-12
        assert torch.equal(v, qkv[:, :, 5:]) and v.data_ptr() != qkv.data_ptr()
        # and q, k are the transformers RoPE
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q_ref, k_ref = apply_rotary_pos_emb(qkv[:, :, :3].transpose(1, 2), qkv[:, :, 3:5].transpose(1, 2), cos, sin)
        assert _rel(q, q_ref.transpose(1, 2)) < 1e-15 and _rel(k, k_ref.transpose(1, 2)) < 1e-15


def test_repacked_4bit_weight_is_refused_by_merge_and_fast_path(tmp_path, save_tiny):
    """One guard serves the exact merge and the fused layers: a weight bitsandbytes has repacked for
    its AVX512-BF16 CPU kernel is refused with the same clear message, not dequantized wrongly."""
    from qfine.fast.nf4 import dequantize
    from qfine.quant import KINDS
    from qfine.util.errors import QfineError

    model = lora_model(save_tiny(tmp_path / "m"))
    base = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert torch.equal(dequantize(base, torch.float32), KINDS.dequantize(base))
    base.weight.quant_state.packing_format_for_cpu = True
    for call in (lambda: dequantize(base, torch.float32), lambda: KINDS.dequantize(base)):
        with pytest.raises(QfineError, match="repacked by bitsandbytes' AVX512-BF16 CPU path"):
            call()


def test_no_fast_path_flag_and_cpu_report(tmp_path, save_tiny):
    from qfine import config as C
    from qfine.cli import build_parser
    from qfine.cli.train import _build_config
    from qfine.fast import enable_fast_path

    ns = build_parser().parse_args(["train", "--no-fast-path"])
    assert _build_config(ns).train.fast_path is False and C.RunConfig().train.fast_path is True
    ns = build_parser().parse_args(["train", "--offload-checkpoints"])
    assert _build_config(ns).train.offload_checkpoints is True and C.RunConfig().train.offload_checkpoints is False
    model = lora_model(save_tiny(tmp_path / "m"))
    report = enable_fast_path(model, "cpu")
    assert str(report) == "fast path off: the fused kernels are for CUDA, this run is on cpu"
    assert not any(isinstance(m, FastDecoderLayer) for m in model.modules())


def test_purely_causal_steps_reach_attention_without_a_mask(tmp_path, save_tiny, monkeypatch):
    """Under a CUDA-graph capture transformers cannot look at the inputs and builds an explicit causal mask,
    which takes SDPA off flash attention. Emulated here by disabling its mask skip: the fused layers must
    still call attention with no mask (is_causal) in the forward *and* in the checkpoint recompute, and
    must keep a real padding mask."""
    import transformers.masking_utils as mu
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def probe(module, q, k, v, attention_mask, **kw):
        seen.append(attention_mask is None)
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kw)

    AttentionInterface.register("qfine_probe", probe)
    AttentionMaskInterface.register("qfine_probe", mu.sdpa_mask)
    model = lora_model(save_tiny(tmp_path / "m"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_base_model().set_attn_implementation("qfine_probe")
    ids, labels = _batch()
    ref_loss, ref_grads, _ = _loss_and_grads(model, ids, labels)
    apply_fast_path(model)
    monkeypatch.setattr(mu, "_ignore_causal_mask_sdpa", lambda *a, **k: False)  # as under capture
    seen.clear()
    loss, grads, _ = _loss_and_grads(model, ids, labels)
    assert seen == [True] * 4  # two layers, forward and recompute
    assert _rel(loss, ref_loss) < 1e-5 and max(_rel(grads[n], g) for n, g in ref_grads.items()) < 1e-4
    seen.clear()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row: a mask that matters
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert seen == [False] * 4


@pytest.mark.parametrize("kind,extra,seq,expected", [
    ("llama", {}, 24, True), ("mistral", {"sliding_window": 16}, 24, False),
    ("mistral", {"sliding_window": 32}, 24, True), ("qwen2", {"sliding_window": 16}, 24, True)])
def test_purely_causal_respects_sliding_windows(kind, extra, seq, expected):
    from transformers import AutoConfig

    from qfine.fast.swap import _purely_causal

    config = AutoConfig.for_model(kind, **extra)  # qwen2: use_sliding_window is off by default
    ids = torch.zeros(1, seq, dtype=torch.long)
    assert _purely_causal(config, ids, None, None, None) is expected
    assert _purely_causal(config, ids, torch.ones_like(ids), None, None) is False


@pytest.mark.parametrize("settings,why", [
    (dict(use_dora=True), "LoRA variant DoraLinearVariant"),
    (dict(lora_bias=True), "lora_bias"),
])
def test_lora_forms_the_kernels_do_not_implement_run_the_reference(tmp_path, save_tiny, settings, why):
    """An allow-list: DoRA, LoRA biases (and any form added to peft later) are never computed as plain LoRA."""
    from peft import LoraConfig, get_peft_model

    from qfine import load_model

    loaded = load_model(str(save_tiny(tmp_path / "m")), compute_dtype="fp32", device="cpu")
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **settings)).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    ids, labels = _batch()
    ref_loss, ref_grads, _ = _loss_and_grads(model, ids, labels)
    report = apply_fast_path(model)
    assert report.fused == 0 and f"2 with {why} (self_attn.q_proj)" in str(report), str(report)
    loss, grads, _ = _loss_and_grads(model, ids, labels)
    assert _rel(loss, ref_loss) < 1e-5
    assert max(_rel(grads[n], ref_grads[n]) for n in ref_grads) < 1e-4


def test_a_subclass_of_a_peft_layer_is_not_taken_for_plain_lora(tmp_path, save_tiny):
    from peft.tuners.lora.bnb import Linear4bit

    from qfine.fast.lora import describe_proj

    model = lora_model(save_tiny(tmp_path / "m"))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer) is Linear4bit and not isinstance(describe_proj(layer), str)
    layer.__class__ = type("SomeNewVariant", (Linear4bit,), {})
    assert describe_proj(layer) == "peft layer SomeNewVariant is not a plain LoRA linear"


def test_fp32_model_under_bf16_autocast(tmp_path, save_tiny):
    """--compute-dtype fp32 with bf16 mixed precision: the fused layers and loss compute in bf16 (as a
    bf16 model's would) and hand fp32 back; they agree with fp32 arithmetic as well as peft's own
    autocast path does (measured: 1.9 % worst gradient for peft, 2.1 % fused)."""
    model = lora_model(save_tiny(tmp_path / "m"), "nf4")
    ids, labels = _batch()

    def step(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _loss_and_grads(model, ids, labels)[:2]

    exact_loss, exact = step(False)
    ref_loss, ref = step(True)
    apply_fast_path(model)
    loss, grads = step(True)
    assert all(g.dtype == torch.float32 for g in grads.values())
    ref_err = max(_rel(ref[n], exact[n]) for n in exact)
    fast_err = max(_rel(grads[n], exact[n]) for n in exact)
    assert _rel(loss, exact_loss) < 1e-3 and _rel(ref_loss, exact_loss) < 1e-3
    assert 1e-4 < ref_err and fast_err < 2 * ref_err, (fast_err, ref_err)


def test_fused_kernels_are_compiled_per_signature():
    """A new dtype, flag or thread count gets a compiled copy of its own (dynamo would otherwise pile
    variants onto one code object until its recompile limit sends the kernel back to eager code)."""
    a = torch.zeros(5, 64)
    sig = ops.signature
    assert sig((a, 1e-6)) == sig((torch.zeros(9, 128), 1e-6))  # sizes are dynamo's (dynamic after a change)
    assert sig((a, 1e-6)) != sig((a.to(torch.bfloat16), 1e-6))
    assert sig((a, 1e-6)) != sig((a[None], 1e-6))
    assert sig((a, 1e-6)) != sig((a, 1e-5))
    copy = ops._fresh_copy(ops._rstd)
    assert copy.__code__ is not ops._rstd.__code__ and torch.equal(copy(a + 1, 1e-6), ops._rstd(a + 1, 1e-6))


def test_offloaded_inputs_are_split_into_power_of_two_pieces():
    """torch's pinned-memory cache rounds each allocation up to a power of two; the pieces add up to
    the tensor's bytes and only the last (under MIN_PIECE) is not a power of two itself."""
    from qfine.fast.offload import MIN_PIECE, piece_sizes

    nbytes = 344_064 * 4096 * 2  # one 8B layer input at 344,064 tokens: 2.625 GiB, rounded up it would be 4
    sizes = piece_sizes(nbytes)
    assert sum(sizes) == nbytes and sizes == sorted(sizes, reverse=True)
    assert sizes == [2**31, 2**29, 2**27]
    odd = piece_sizes(3 * MIN_PIECE + 1234)
    assert odd == [2 * MIN_PIECE, MIN_PIECE, 1234]
    assert piece_sizes(100) == [100] and piece_sizes(0) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_input_comes_back_bit_for_bit_from_its_pieces():
    """An odd-sized, non-contiguous bf16 layer input goes to pinned pieces and back unchanged, and the
    previous layer's input is on its way when the next one is fetched."""
    from qfine.fast.offload import Offloader, piece_sizes

    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(3, 4096, 1365, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(2)]
    off = Offloader(offload=True)
    entries = [off.save(x, i) for i, x in enumerate(xs)]
    nbytes = xs[0].numel() * 2
    assert [p.numel() for p in entries[1].host] == piece_sizes(nbytes) and len(entries[1].host) > 2
    assert all(p.is_pinned() for p in entries[1].host)
    back1 = entries[1].fetch()
    assert entries[0].gpu is not None  # prefetched
    back0 = entries[0].fetch()
    torch.cuda.synchronize()
    assert back1.shape == xs[1].shape and torch.equal(back1, xs[1]) and torch.equal(back0, xs[0])
