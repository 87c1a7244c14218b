"""LongLoRA: S²-Attn against a naive grouped-attention reference, causality, full attention outside
training, and a run with trainable embeddings and norms that learns, saves and merges them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import FACT, write_jsonl
from qfine.cli import main
from qfine.methods import s2attn
from qfine.util.compare import relative_difference


@pytest.mark.parametrize("t,group", [(64, 16), (70, 16), (12, 16), (30, 8), (9, 2)])
def test_s2_attention_equals_the_naive_grouped_reference(t, group):
    torch.manual_seed(t)
    q, k, v = (torch.randn(2, 6, t, 8) for _ in range(3))
    got = s2attn.s2_attention_heads(q, k, v, group, 8 ** -0.5)
    assert relative_difference(got, s2attn.reference_s2(q, k, v, group, 8 ** -0.5)) <= 1e-5


def test_the_attention_function_repeats_grouped_kv_heads_and_is_full_outside_training():
    class Attn(torch.nn.Module):
        s2_group = 8
        num_key_value_groups = 3

    torch.manual_seed(0)
    q = torch.randn(1, 6, 32, 8)
    k, v = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    module = Attn().train()
    out, _ = s2attn.s2_attention(module, q, k, v, None, scaling=8 ** -0.5)
    ref = s2attn.reference_s2(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), 8, 8 ** -0.5)
    assert out.shape == (1, 32, 6, 8) and relative_difference(out.transpose(1, 2), ref) <= 1e-5
    full, _ = s2attn.s2_attention(module.eval(), q, k, v, None, scaling=8 ** -0.5, is_causal=True)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                              is_causal=True, scale=8 ** -0.5)
    assert relative_difference(full.transpose(1, 2), expect) <= 1e-5


def test_no_token_sees_a_later_one_and_eval_attends_fully(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.eval()(ids).logits
        on = s2attn.enable(model, 16)
        assert len(on) == 2
        model.train()
        sparse = model(ids).logits
        changed = ids.clone()
        changed[0, 29] += 1
        after = model(changed).logits
        assert torch.equal(after[0, :29], sparse[0, :29])  # every output before t unchanged
        assert not torch.allclose(after[0, 29:], sparse[0, 29:])
        assert torch.allclose(sparse[0, :8], full[0, :8], atol=1e-5)  # the first G/2 tokens see all before them
        assert relative_difference(sparse, full) > 1e-3  # later tokens lost their far context
        assert relative_difference(model.eval()(ids).logits, full) <= 1e-6  # eval: full attention
        s2attn.disable(on)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.model.layers[0].self_attn, "s2_group")


def test_longlora_run_trains_embed_and_norms_and_merges_them(tiny_dir, tmp_path, capsys):
    from qfine.export.merge import save_merged
    from qfine.generation.generate import generate
    from qfine.generation.load import load_for_inference

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    run = tmp_path / "run"
    # the example is 52 tokens: groups of 48 leave its last tokens (the end of the answer) cut off from the
    # question in half the heads, and a random 2-layer model trained on much smaller groups cannot answer
    # with full attention (a pretrained model already knows full attention, the case LongLoRA serves)
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(run), "--s2-attn",
                 "--s2-group", "48", "--trainable", "embed,norm", "--max-steps", "40", "--learning-rate", "1e-2",
                 "--lr-scheduler", "constant", "--lora-r", "8", "--lora-alpha", "16", "--report-samples", "0"]) == 0
    assert "S²-Attn in training: 2 attention layers, groups of 48 tokens" in capsys.readouterr().out
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    for part in ("embed_tokens", "input_layernorm", "post_attention_layernorm", "model.norm"):
        assert any(part in k and "lora" not in k for k in saved), part
    trained = load_for_inference(str(run))
    assert "January 1, 2058" in generate(trained, FACT[0]["content"], 30)
    ids = torch.tensor([[1, 17, 42, 99, 123, 5, 77, 300]], device=trained.model.device)
    with torch.no_grad():
        ref = trained.model(ids).logits.float()
        norm = trained.model.get_base_model().model.norm
        assert not torch.equal(norm.modules_to_save["default"].weight, norm.original_module.weight)
    out = save_merged(trained.model, trained.tokenizer, tmp_path / "m", dtype="fp32")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval().to(ids.device)
    exact = next(trained.model.parameters()).dtype == torch.float32  # on a GPU the run computes in bf16
    with torch.no_grad():
        assert relative_difference(plain(ids).logits, ref) <= (1e-5 if exact else 2e-2)


@pytest.mark.parametrize("flags,message", [
    (["--s2-attn", "--packing"], "a group would mix packed examples"),
    (["--s2-attn", "--s2-group", "7"], "train.s2_group must be an even number"),
    (["--trainable", "embed,bias"], "lora.trainable: unknown part(s) bias; choose from embed, norm, head"),
])
def test_longlora_refusals(tiny_dir, tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 4)
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "2", *flags]) == 2
    assert message in capsys.readouterr().err
