"""LoRA variants on 4-bit bases: DoRA and rsLoRA merged exactly, LoftQ's initial error, PiSSA on a
16-bit base, the refusals, and the fact test (train → answer → exact merge → reload) for each."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FACT, write_jsonl
from qfine import LoraSettings, add_lora, load_model
from qfine.cli import main
from qfine.export.merge import save_merged
from qfine.methods.loftq import loftq_init
from qfine.methods.lora import add_adapter, set_active
from qfine.methods.merge_rule import merged_weight
from qfine.models.weights import pristine_reader
from qfine.probe import Fact, seed_experiment
from qfine.quant import KINDS
from qfine.util.compare import relative_difference

IDS = torch.tensor([[1, 17, 42, 99, 1234, 5, 77, 300]])
PROJ = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _as_if_trained(model, seed=1):
    """Random B and magnitudes 0.5–1.5× their start, as training would leave them (peft starts DoRA at f = 1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    return model.eval()


@torch.no_grad()
def _logits(model):
    return model(IDS.to(model.device)).logits.float().cpu()


@pytest.mark.parametrize("variant,rslora", [("dora", False), ("lora", True), ("dora", True)])
def test_dora_and_rslora_merge_exactly(tiny_dir, tmp_path, variant, rslora):
    loaded = load_model(str(tiny_dir), compute_dtype="fp32")
    model = _as_if_trained(add_lora(loaded.model, LoraSettings(r=4, alpha=12, variant=variant, rslora=rslora,
                                                               target_modules=PROJ)))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(12 / (math.sqrt(4) if rslora else 4))
    assert ("default" in layer.lora_magnitude_vector) == (variant == "dora")
    ref = _logits(model)
    out = save_merged(model, loaded.tokenizer, tmp_path / "merged", dtype="fp32")
    got = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    assert relative_difference(got, ref) <= 1e-5
    with model.disable_adapter():
        assert relative_difference(_logits(model), ref) > 1e-3  # the update mattered


def test_a_dora_and_a_lora_adapter_active_together_merge_exactly(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir), compute_dtype="fp32")
    model = add_lora(loaded.model, LoraSettings(r=4, alpha=8, variant="dora", target_modules=PROJ))
    add_adapter(model, "plain", LoraSettings(r=2, alpha=4, target_modules=PROJ), seed=3)
    set_active(model, ["default", "plain"])
    _as_if_trained(model)
    ref = _logits(model)
    out = save_merged(model, loaded.tokenizer, tmp_path / "merged", dtype="fp32")
    got = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    assert relative_difference(got, ref) <= 1e-5
    set_active(model, "default")
    assert relative_difference(_logits(model), ref) > 1e-3  # the second adapter mattered


def test_loftq_starts_at_the_best_rank_r_correction(tiny_dir):
    full = load_model(str(tiny_dir), quantization="none", compute_dtype="fp32").model.eval()
    target = _logits(full)
    errors = {}
    for init in ("default", "loftq"):
        loaded = load_model(str(tiny_dir), compute_dtype="fp32")
        # rsLoRA and alpha ≠ r: a scaling s ≠ 1 that the initialisation must divide out
        model = add_lora(loaded.model, LoraSettings(r=8, alpha=4, rslora=True, target_modules=PROJ)).eval()
        if init == "loftq":
            report = loftq_init(model, pristine_reader(str(tiny_dir)))
        errors[init] = relative_difference(_logits(model), target)
    assert report.layers == 2 * len(PROJ)
    assert report.after < 0.9 * report.before, report.line()
    assert errors["loftq"] < 0.9 * errors["default"], errors
    # Eckart–Young: what is left of one layer's error is exactly its singular values beyond rank 8
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    w = pristine_reader(str(tiny_dir))("model.layers.1.mlp.up_proj.weight").float()
    deq = KINDS.dequantize(layer.get_base_layer())
    err = w.to(deq.device) - deq
    with torch.no_grad():
        left = err - layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    tail = torch.linalg.svdvals(err)[8:].square().sum().sqrt()
    assert float(left.norm()) == pytest.approx(float(tail), rel=1e-4)


def test_loftq_with_dora_starts_at_the_corrected_weight(tiny_dir):
    loaded = load_model(str(tiny_dir), compute_dtype="fp32")
    model = add_lora(loaded.model, LoraSettings(r=4, alpha=8, variant="dora", target_modules=PROJ))
    loftq_init(model, pristine_reader(str(tiny_dir)))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    q = KINDS.dequantize(layer.get_base_layer())
    with torch.no_grad():
        update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert float(update.norm()) > 1e-3
        assert relative_difference(merged_weight(layer, q), q + update) <= 1e-6


def test_pissa_on_a_16_bit_base_starts_unchanged_and_merges_exactly(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir), quantization="none", compute_dtype="fp32")
    before = _logits(loaded.model.eval())
    model = add_lora(loaded.model, LoraSettings(r=4, alpha=4, init="pissa", target_modules=PROJ)).eval()
    assert relative_difference(_logits(model), before) <= 1e-5  # W_res + BA = W
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert float(layer.lora_B["default"].weight.norm()) > 0  # B is not zero: the top singular directions
    ref = _logits(_as_if_trained(model))
    out = save_merged(model, loaded.tokenizer, tmp_path / "merged", dtype="fp32")
    got = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    assert relative_difference(got, ref) <= 1e-5


@pytest.mark.parametrize("flags,message", [
    (["--lora-init", "pissa"], "lora.init pissa moves the top singular directions out of the frozen base weights, "
                               "which a nf4 base cannot take"),
    (["--lora-init", "loftq", "--quantization", "int8"], "this base is model.quantization int8"),
    (["--lora-variant", "vera"], "lora.variant must be one of lora, dora, not 'vera'"),
    (["--lora-init", "olora"], "lora.init must be one of default, gaussian, loftq, pissa, not 'olora'"),
])
def test_unsupported_combinations_are_refused_before_loading(tiny_dir, tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 4)
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("lora", [{"variant": "dora"},
                                  pytest.param({"init": "loftq"}, marks=pytest.mark.slow),
                                  pytest.param({"rslora": True, "alpha": 4}, marks=pytest.mark.slow)],
                         ids=["dora", "loftq", "rslora"])
def test_each_method_learns_the_fact_and_keeps_it_through_the_merge(tmp_path, tiny_dir, lora):
    fact = Fact("What day was I born?", "January 1, 2058", "January 1, 2058")
    r = seed_experiment(fact, tmp_path, source=str(tiny_dir), steps=40, lr=2e-2, merge_dtype="fp32", lora=lora)
    knows = r.knows(fact)
    assert not knows["before"] and knows["after"] and knows["merged"], (r.before, r.after, r.merged)
    assert r.merged_rel_diff <= (1e-5 if not torch.cuda.is_available() else 2e-2)
