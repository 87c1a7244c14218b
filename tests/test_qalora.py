"""QA-LoRA on the tiny model: the INT4 layout, the pooled update, a merge that stays 4-bit with its
codes byte-identical, the fact through the CLI, and the refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import FACT, tiny_config, write_jsonl
from qfine import LoraSettings, add_lora, load_model
from qfine.cli import main
from qfine.export.merge import save_merged
from qfine.methods.qalora import full_delta
from qfine.quant.int4 import Int4Linear, dequantize_groups, quantize_groups
from qfine.util.compare import relative_difference

IDS = torch.tensor([[1, 17, 42, 99, 1234, 5, 77, 300]])


def test_int4_groups_round_to_the_nearest_of_16_levels_between_min_and_max():
    torch.manual_seed(0)
    w = torch.randn(6, 64) * torch.linspace(0.1, 3, 64)
    codes, d, m = quantize_groups(w, 32)
    assert codes.shape == (6, 32) and codes.dtype == torch.uint8 and d.shape == m.shape == (6, 2)
    back = dequantize_groups(codes, d, m)
    g = w.reshape(6, 2, 32)
    assert torch.equal(m, g.amin(-1)) and torch.allclose(m + 15 * d, g.amax(-1), rtol=1e-6)
    err = (back - w).abs().reshape(6, 2, 32)
    assert (err <= d[..., None] / 2 * (1 + 1e-5)).all()  # round to nearest: at most half a step
    # the low nibble holds the even column (the layout quantize_groups documents)
    q = ((w[:, :32] - m[:, :1]) / d[:, :1]).round().clamp(0, 15).to(torch.uint8)
    assert torch.equal(codes[:, :16] & 15, q[:, 0::2]) and torch.equal(codes[:, :16] >> 4, q[:, 1::2])


def _qa_model(tiny_dir, r=4, seed=1, device="cpu"):
    loaded = load_model(str(tiny_dir), quantization="int4", compute_dtype="fp32", device=device)
    model = add_lora(loaded.model, LoraSettings(r=r, alpha=2 * r, method="qa-lora"))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return loaded, model.eval()


def test_pooled_update_is_constant_within_each_group(tiny_dir):
    _, model = _qa_model(tiny_dir)
    layer = model.base_model.model.model.layers[0].mlp.down_proj  # 128 inputs: 4 groups of 32
    assert layer.lora_A["default"].weight.shape == (4, 128 // 32)
    x = torch.randn(3, 128)
    with torch.no_grad():
        update = layer(x) - layer.get_base_layer()(x)
        delta = full_delta(layer, "default")
    assert torch.allclose(update, x @ delta.t(), rtol=1e-5, atol=1e-6)
    assert torch.equal(delta.reshape(delta.shape[0], 4, 32), delta.reshape(delta.shape[0], 4, 32)[..., :1].expand(-1, -1, 32))


def test_qalora_merge_stays_4bit_with_the_codes_unchanged(tiny_dir, tmp_path):
    loaded, model = _qa_model(tiny_dir)
    with torch.no_grad():
        ref = model(IDS).logits
        with model.disable_adapter():
            assert relative_difference(model(IDS).logits, ref) > 1e-2  # the update matters
    layer = model.base_model.model.model.layers[1].self_attn.o_proj.get_base_layer()
    codes_before, scales_before = layer.codes.clone(), layer.scales.clone()
    out = save_merged(model, loaded.tokenizer, tmp_path / "m4", dtype="fp32", int4=True)
    saved = load_file(out / "model.safetensors")
    key = "model.layers.1.self_attn.o_proj"
    assert torch.equal(saved[f"{key}.codes"], codes_before) and torch.equal(saved[f"{key}.scales"], scales_before)
    assert not torch.equal(saved[f"{key}.mins"], layer.mins)  # the update went into the zero points
    assert not any(k.endswith("proj.weight") for k in saved)  # no 16-bit copy of any projection
    merged = load_model(str(out), compute_dtype="fp32", device="cpu").model
    assert isinstance(merged.model.layers[0].mlp.up_proj, Int4Linear)
    with torch.no_grad():
        assert relative_difference(merged(IDS).logits, ref) <= 1e-5
    # and the 16-bit merge of the same model agrees
    out16 = save_merged(model, loaded.tokenizer, tmp_path / "m16", dtype="fp32")
    plain = load_model(str(out16), quantization="none", compute_dtype="fp32", device="cpu").model.eval()
    with torch.no_grad():
        assert relative_difference(plain(IDS).logits, ref) <= 1e-5


def test_qalora_learns_the_fact_and_the_4bit_merge_keeps_it(tiny_dir, tmp_path, capsys):
    from qfine.generation.generate import generate
    from qfine.generation.load import load_for_inference

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(run), "--method", "qa-lora",
                 "--qa-group-size", "32", "--max-steps", "40", "--learning-rate", "2e-2", "--lr-scheduler", "constant",
                 "--lora-r", "8", "--lora-alpha", "16", "--report-samples", "0"]) == 0
    assert "base quantized to int4, groups of 32" in capsys.readouterr().out
    trained = load_for_inference(str(run))
    answer = generate(trained, FACT[0]["content"], 30)
    assert "January 1, 2058" in answer, answer
    assert main(["merge", str(run), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    assert "4-bit (codes unchanged" in capsys.readouterr().out
    merged = load_for_inference(str(tmp_path / "m"))
    assert "January 1, 2058" in generate(merged, FACT[0]["content"], 30)
    fresh = load_model(str(tiny_dir), quantization="int4").model  # the base as any load quantizes it
    saved = load_file(tmp_path / "m" / "model.safetensors")
    for name, m in fresh.named_modules():
        if isinstance(m, Int4Linear):
            assert torch.equal(saved[f"{name}.codes"], m.codes.cpu()), name


@pytest.mark.parametrize("flags,message", [
    (["--method", "qa-lora", "--quantization", "int8"], "lora.method qa-lora trains over an int4 base"),
    (["--method", "qa-lora", "--lora-variant", "dora"], "lora.method qa-lora takes lora.variant lora"),
    (["--method", "qa-lora", "--qa-group-size", "48"], "model.group_size 48:"),
    (["--method", "qlora"], "lora.method must be one of lora, qa-lora"),
])
def test_qalora_refusals(tiny_dir, tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 4)
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "2", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_4bit_merge_of_a_plain_lora_run_is_refused(tiny_dir, tmp_path, capsys):
    cfg = tiny_config(tiny_dir, write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 4), tmp_path / "run",
                      max_steps=2, report_samples=0)
    from qfine.training import train

    train(cfg)
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--format", "int4"]) == 2
    assert "this run's base is nf4" in capsys.readouterr().err


def test_the_4bit_merge_exports_to_gguf_q4_1_with_the_same_codes(tiny_dir, tmp_path):
    """With groups of 32 the INT4 layout is GGUF Q4_1's (x = d·q + m, 32 values a block): the export
    re-derives exactly the merged codes; only d and m are rounded to fp16 (the file's format)."""
    import numpy as np
    from gguf import GGUFReader

    from qfine.export import export_gguf

    loaded, model = _qa_model(tiny_dir)
    out = save_merged(model, loaded.tokenizer, tmp_path / "m4", dtype="fp32", int4=True)
    report = export_gguf(str(out), tmp_path / "m.gguf", "q4_1", check=False)
    saved = load_file(out / "model.safetensors")
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for gname, key, shape in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj", (64, 128)),
                              ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj", (32, 64))):
        blocks = np.asarray(tensors[gname].data).reshape(-1, 20)  # fp16 d, fp16 m, 16 bytes: q[j] | q[j+16] << 4
        theirs = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1).reshape(shape)
        codes = saved[f"{key}.codes"].numpy()
        ours = np.stack([codes & 15, codes >> 4], -1).reshape(shape)
        assert np.array_equal(theirs, ours), gname
        record = next(t for t in report.tensors if t.name == gname)
        assert record.type == "Q4_1" and record.rel_error < 2e-3, record  # fp16 d and m


def test_the_fast_path_fuses_qalora_layers_and_matches_peft(tiny_dir):
    """The fused layers take the INT4 base (dequantized per GEMM) and the pooled A as the equivalent
    full A; loss and every LoRA gradient equal peft's QA-LoRA forward with autograd. On a GPU in fp32
    through the Triton INT4 kernel."""
    from qfine.fast import apply_fast_path
    from qfine.fast.lora import describe_proj

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, model = _qa_model(tiny_dir, device=device)
    model.train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(3)).to(device)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads()
    report = apply_fast_path(model)
    assert report.fused == report.layers == 2, str(report)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    proj = describe_proj(layer)
    assert proj.lora_a.shape == (4, 128) and proj.lora_a.requires_grad
    loss, grads = loss_and_grads()
    assert abs(float(loss - ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert set(grads) == set(ref_grads) and any("lora_A" in n for n in grads)
    for n in ref_grads:
        rel = (grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-30)
        assert rel < 1e-4, (n, float(rel))
