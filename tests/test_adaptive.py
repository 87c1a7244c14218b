"""Adaptive 4/8-bit quantization on the tiny model: the sensitivity measure, the choice within the
budget, the recorded choice reloaded, training and the exact merge on mixed layers, the report."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from helpers import FACT, write_jsonl
from qfine import config as C
from qfine.cli import main
from qfine.export.merge import save_merged
from qfine.quant.adaptive import LayerSensitivity, budget_bytes, choose, extra_int8_bytes, loss_sensitivity, measure
from qfine.util.compare import relative_difference
from qfine.util.errors import QfineError


def test_sensitivity_is_the_relative_output_error_on_the_layer_inputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        model[1].weight[:, :4] *= 40  # a few large columns: NF4's per-block absmax wastes levels on them

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model
            self.device = torch.device("cpu")

        def forward(self, input_ids):
            return self.net(input_ids)

    x = torch.randn(3, 10, 64)
    got = {s.name: s for s in measure(Wrap(), [x], ["net.0", "net.1"])}
    import bitsandbytes.functional as F

    w = model[1].weight.detach()
    q, st = F.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
    h = model[0](x).reshape(-1, 64).detach()
    expect = float((h @ (w - F.dequantize_4bit(q, st)).t()).norm() / (h @ w.t()).norm())
    assert got["net.1"].err_nf4 == pytest.approx(expect, rel=1e-5)
    assert got["net.1"].err_nf4 > got["net.0"].err_nf4 > got["net.0"].err_int8 > 0


class _TinyLM(torch.nn.Module):
    """Embedding → linear → head with the causal-LM loss (labels shifted inside, mean over tokens)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mid, self.head = torch.nn.Embedding(50, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 50)
        self.device = torch.device("cpu")
        for p in self.parameters():
            p.requires_grad_(False)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, labels):
        logits = self.head(self.mid(self.embed(input_ids)))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss})()


def test_loss_sensitivity_is_the_fisher_estimate_from_the_layers_own_inputs_and_output_gradients():
    from qfine.quant.adaptive import _int8, _nf4

    model = _TinyLM()
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    layers = [LayerSensitivity("mid", 64 * 64, 0.0, 0.0)]
    loss_sensitivity(model, [ids], layers)
    x = model.embed(ids).reshape(-1, 64)
    y = model.mid(x).requires_grad_(True)
    logits = model.head(y)
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
    (g,) = torch.autograd.grad(loss, y)
    w = model.mid.weight
    for got, q in ((layers[0].loss_nf4, _nf4), (layers[0].loss_int8, _int8)):
        expect = 0.5 * float(((x @ (q(w) - w).t()) * g).sum(1).square().sum())
        assert got == pytest.approx(expect, rel=1e-4)
    assert layers[0].loss_nf4 > layers[0].loss_int8 > 0
    assert torch.equal(model.mid.weight, w)  # measured, not changed


def test_the_choice_is_loss_saved_per_byte():
    """A layer three times the size must save more than three times the loss to go first."""
    big, small = LayerSensitivity("big", 3 * 4096, 0.3, 0.0, loss_nf4=2.5, loss_int8=0.1), \
        LayerSensitivity("small", 4096, 0.1, 0.0, loss_nf4=1.0, loss_int8=0.1)
    rows = {"big": 64, "small": 64}
    choose([big, small], rows, spare=extra_int8_bytes(3 * 4096, 64))
    assert small.int8 and not big.int8  # 0.9 / 1 unit against 2.4 / 3 units; then big no longer fits


def test_the_most_sensitive_layers_are_kept_within_the_budget():
    layers = [LayerSensitivity(f"l{i}", 4096, err, 0.0) for i, err in enumerate([0.05, 0.30, 0.10, 0.20])]
    rows = {s.name: 64 for s in layers}
    cost = extra_int8_bytes(4096, 64)
    choose(layers, rows, spare=2.5 * cost)
    assert [s.name for s in layers if s.int8] == ["l1", "l3"]  # the two largest errors; a third does not fit
    assert budget_bytes("1.15x", 1000) == 1150 and budget_bytes("2GiB", 1000) == 2 * 2**30
    with pytest.raises(QfineError, match="below the all-NF4"):
        budget_bytes("0.9x", 1000)


def test_adaptive_run_records_its_choice_trains_and_merges_exactly(tiny_dir, tmp_path, capsys):
    from qfine.generation.load import load_for_inference

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(run),
                 # the tiny model is mostly its 16-bit embeddings: its 14 projections in int8 would add 0.3 %
                 "--quantization", "adaptive", "--memory-budget", "1.001x", "--max-steps", "4",
                 "--report-samples", "0"]) == 0
    out = capsys.readouterr().out
    assert "adaptive quantization:" in out and "kept in int8" in out
    chosen = C.load_yaml(run / "config.yaml").model.int8_modules
    assert 0 < len(chosen) < 14  # some, not all, of the 14 projections
    assert "<h2>Adaptive quantization</h2>" in (run / "report.html").read_text()
    loaded = load_for_inference(str(run))
    base = loaded.model.get_base_model()
    for name, m in base.named_modules():
        if name.endswith("_proj") and not name.endswith(("lora_A", "lora_B")) and hasattr(m, "base_layer"):
            kind = bnb.nn.Linear8bitLt if name in chosen else bnb.nn.Linear4bit
            assert isinstance(m.base_layer, kind), (name, type(m.base_layer))
    # as for an all-int8 base (tests/test_merge.py): the unmerged int8 layers also round their inputs
    # (LLM.int8()), so the merge is checked against the same model merged in place, layer by layer
    from qfine.methods.lora import merged as merged_in_memory

    ids = torch.tensor([[1, 17, 42, 99, 123, 5, 77, 300]], device=loaded.model.device)
    with torch.no_grad(), merged_in_memory(loaded.model):
        ref = loaded.model(ids).logits.float()
    merged = save_merged(loaded.model, loaded.tokenizer, tmp_path / "m", dtype="fp32")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval().to(ids.device)
    exact = next(loaded.model.parameters()).dtype == torch.float32  # on a GPU the run computes in bf16
    with torch.no_grad():
        assert relative_difference(plain(ids).logits, ref) <= (1e-5 if exact else 2e-2)


def test_a_budget_below_all_nf4_is_refused(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 4)
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--quantization", "adaptive", "--memory-budget", "0.5x", "--max-steps", "2"]) == 2
    assert "below the all-NF4 model's" in capsys.readouterr().err
