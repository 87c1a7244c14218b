"""Exact merge on a tiny random Llama: fidelity, sharding, pristine base, requantize, the CPU trap."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import write_jsonl
from qfine import LoraSettings, add_lora, load_model
from qfine.export.merge import merged_tensors, requantize_folder, save_merged
from qfine.quant import KINDS
from qfine.quant.bnb4 import guard_cpu_repack
from qfine.util.compare import relative_difference
from qfine.util.errors import QfineError

IDS = torch.tensor([[1, 17, 42, 99, 1234, 5, 77, 300]])


def _trained_like(tiny_dir, seed=1, **lora):
    """A 4-bit tiny model (fp32 compute, on any device) with LoRA whose B matrices are random (as if trained)."""
    loaded = load_model(str(tiny_dir), compute_dtype="fp32")
    model = add_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0, **lora))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return loaded, model.eval()


def test_fp32_merge_matches_unmerged_logits(tiny_dir, tmp_path):
    loaded, model = _trained_like(tiny_dir)
    with torch.no_grad():
        ref = model(IDS.to(model.device)).logits
    out = save_merged(model, loaded.tokenizer, tmp_path / "merged", dtype="fp32")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = plain(IDS.to(plain.device)).logits
    assert relative_difference(got, ref) <= 1e-5
    with torch.no_grad(), model.disable_adapter():
        base = model(IDS.to(model.device)).logits
    assert relative_difference(base, ref) > 1e-3  # the adapter mattered, so the check above means something
    # plain transformers folder: config without quantization, tokenizer, generation config
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".merged.tmp-*"))


def test_bf16_merge_close_and_sharded(tiny_dir, tmp_path):
    loaded, model = _trained_like(tiny_dir)
    with torch.no_grad():
        ref = model(IDS.to(model.device)).logits
    out = save_merged(model, loaded.tokenizer, tmp_path / "m", dtype="bf16", max_shard_bytes=2_000_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.dtype == torch.bfloat16
    with torch.no_grad():
        got = plain(IDS.to(plain.device)).logits.float()
    assert relative_difference(got, ref) < 2e-2


def test_merge_formula_per_layer(tiny_dir):
    """W = dequant(W4) + scaling * B @ A for an adapted layer; untouched layers are the dequantized weight."""
    _, model = _trained_like(tiny_dir, target_modules=["q_proj"])
    tensors = dict(merged_tensors(model, torch.float32))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = KINDS.dequantize(layer.base_layer) + layer.scaling["default"] * (
        layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float())
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], expected)
    k = model.base_model.model.model.layers[0].self_attn.k_proj
    assert torch.equal(tensors["model.layers.0.self_attn.k_proj.weight"], KINDS.dequantize(k))
    assert not any("lora" in key or "base_layer" in key for key in tensors)


def test_pristine_base_uses_original_weights(tiny_dir, tmp_path):
    from safetensors import safe_open

    loaded, model = _trained_like(tiny_dir, target_modules=["q_proj"])
    out = save_merged(model, loaded.tokenizer, tmp_path / "p", dtype="fp32", base="pristine", source=str(tiny_dir))
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        original = f.get_tensor("model.layers.1.self_attn.q_proj.weight").float()
    with safe_open(out / "model.safetensors", "pt") as f:
        merged = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    delta = layer.scaling["default"] * (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float())
    delta = delta.cpu()
    assert torch.allclose(merged, original + delta, atol=1e-6)
    # and it differs from the dequantized-base merge by the quantization error
    assert (merged - (KINDS.dequantize(layer.base_layer).cpu() + delta)).abs().max() > 1e-3


def test_existing_output_is_not_overwritten(tiny_dir, tmp_path):
    loaded, model = _trained_like(tiny_dir)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep").write_text("x")
    with pytest.raises(QfineError, match="already exists"):
        save_merged(model, loaded.tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "keep").read_text() == "x"


def test_interrupted_merge_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import qfine.export.merge as M

    loaded, model = _trained_like(tiny_dir)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(M, "write_sharded", boom)
    with pytest.raises(RuntimeError):
        M.save_merged(model, loaded.tokenizer, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_requantize_is_lossy_and_measured(tiny_dir, tmp_path):
    loaded, model = _trained_like(tiny_dir)
    with torch.no_grad():
        ref = model(IDS.to(model.device)).logits
    merged = save_merged(model, loaded.tokenizer, tmp_path / "m16", dtype="fp32")
    q = requantize_folder(merged, tmp_path / "m4", "nf4")
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    model4 = AutoModelForCausalLM.from_pretrained(q)
    guard_cpu_repack(model4)
    with torch.no_grad():
        got = model4(IDS.to(model4.device)).logits
    diff = relative_difference(got, ref)
    assert 1e-4 < diff < 1.0  # requantizing the merged weights is not exact, but the model survives
    # qfine loads the pre-quantized folder with its own quantization, whatever --quantization says
    again = load_model(str(q), quantization="none", compute_dtype="fp32")
    assert type(again.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.equal(again.model(IDS.to(again.model.device)).logits.cpu(), got.cpu())


def test_eval_then_train_then_merge_equals_train_then_merge(tiny_dir):
    """The bitsandbytes AVX512-BF16 trap: a no-grad eval forward must not change what training and merging see."""

    def run(eval_first: bool):
        loaded = load_model(str(tiny_dir))
        assert guard_cpu_repack(loaded.model) == 14  # every Linear4bit (7 per layer x 2 layers) is guarded
        torch.manual_seed(0)
        model = add_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0))
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(IDS.to(model.device))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            loss = model(input_ids=IDS.to(model.device), labels=IDS.to(model.device)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        return dict(merged_tensors(model, torch.float32)), loss.item()

    a, loss_a = run(eval_first=True)
    b, loss_b = run(eval_first=False)
    assert loss_a == loss_b
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_modules_to_save_are_merged_from_the_trained_copy(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir), compute_dtype="fp32")
    model = add_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"],
                                                modules_to_save=["lm_head"]))
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(0.01)
    model.eval()
    with torch.no_grad():
        ref = model(IDS.to(model.device)).logits
    tensors = dict(merged_tensors(model, torch.float32))
    assert torch.equal(tensors["lm_head.weight"], head.modules_to_save["default"].weight.float())
    assert not any("modules_to_save" in k or "original_module" in k for k in tensors)
    out = save_merged(model, loaded.tokenizer, tmp_path / "m", dtype="fp32")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(IDS).logits
    assert relative_difference(got, ref) <= 1e-5


@pytest.mark.parametrize("lora,trained", [
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "lm_head"),
    (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), "embed_tokens"),
    (dict(target_modules=["all-linear", "lm_head"]), "lm_head"),
])
def test_merge_of_a_tied_model_whose_head_or_embedding_was_trained(tmp_path, save_tiny, lora, trained):
    """SmolLM2 ties lm_head to embed_tokens. Training one of them on its own (a full copy in
    modules_to_save, or LoRA on the head) unties them in effect: the merge must write both and untie
    the config, or a reload re-ties them and one side's training is gone."""
    folder = save_tiny(tmp_path / "tied", tie_word_embeddings=True)
    loaded = load_model(str(folder), compute_dtype="fp32")
    model = add_lora(loaded.model, LoraSettings(r=4, alpha=8, **lora), seed=0)
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if p.requires_grad:  # as if trained: every trainable tensor moved (zero B, copies equal to the base)
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    ids = IDS.clamp_max(300).to(model.device)
    with torch.no_grad():
        ref = model(ids).logits
    out = save_merged(model, loaded.tokenizer, tmp_path / "merged", dtype="fp32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = plain(ids.to(plain.device)).logits
    assert relative_difference(got, ref) <= 1e-5
    emb, head = plain.get_input_embeddings().weight, plain.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr() and not torch.equal(emb, head)


def test_int8_base_trains_and_merges_exactly(tiny_dir, tmp_path):
    """causal-lm on an 8-bit base: trains, and the merge writes dequant(W8) + LoRA exactly. The
    unmerged int8 model also rounds its inputs (LLM.int8()), so it is compared within that rounding."""
    from helpers import FACT, tiny_config
    from qfine.generation.load import load_for_inference
    from qfine.methods.lora import merged
    from qfine.training import train

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", report_samples=0)  # 20 steps
    cfg.model.quantization, cfg.model.compute_dtype = "int8", "fp32"
    run = train(cfg)
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    loaded = load_for_inference(str(run))
    out = save_merged(loaded.model, loaded.tokenizer, tmp_path / "merged", dtype="fp32")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = IDS.to(loaded.device)
    with torch.no_grad():
        got = plain(IDS.to(plain.device)).logits
        ref = loaded.model(ids).logits
        with merged(loaded.model):
            exact = loaded.model(ids).logits
    assert relative_difference(got, exact) <= 1e-5
    assert relative_difference(got, ref) <= 5e-2  # the int8 input rounding: measured 2.4e-2
