"""CUDA path: 4-bit training with bf16 autocast and paged 8-bit AdamW, exact merge on the GPU.

Marked ``gpu``; skipped where no CUDA device is visible (CI never has one).
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import FACT, tiny_config, write_jsonl
from qfine import LoraSettings, add_lora, load_model
from qfine.export.merge import save_merged
from qfine.training import train
from qfine.util.compare import relative_difference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

IDS = torch.tensor([[1, 17, 42, 99, 1234, 5, 77, 300]])


def test_cuda_training_bf16_paged_optimizer(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", optimizer="paged_adamw_8bit", gradient_checkpointing=True)
    run = train(cfg)
    assert "fast path on: 2 of 2 decoder layers fused" in capsys.readouterr().out  # the default on CUDA
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses
    saved = (run / "config.yaml").read_text()
    assert "precision: auto" in saved


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_cuda_exact_merge(tiny_dir, tmp_path, compute):
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(tiny_dir), compute_dtype=compute)
    assert loaded.device == "cuda"
    model = add_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    with torch.no_grad():
        ref = model(IDS.cuda()).logits.float().cpu()
    out = save_merged(model, loaded.tokenizer, tmp_path / "m", dtype="fp32")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        got = plain(IDS.cuda()).logits.float().cpu()
    diff = relative_difference(got, ref)
    print(f"\n[gpu merge] compute {compute}: fp32 merged vs 4-bit+adapter logits rel. diff {diff:.2e}")
    # fp32 compute: the same arithmetic up to summation order; bf16 compute rounds activations
    assert diff <= (1e-5 if compute == "fp32" else 2e-2)


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_same_seed_same_curve_on_cuda(tiny_dir, tmp_path, capsys):
    """Two identical `qfine train` runs in one process (fast path, CUDA graphs): the first step is
    bit-identical (same starting adapter, same batch); later steps may differ by the GPU's
    non-deterministic reductions (attention backward), within the bound printed and documented."""
    rows = [{"messages": [FACT[0], {"role": "assistant", "content": "It was a day " + "and a night " * (i % 7)}]}
            for i in range(32)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    curves = []
    for name in ("a", "b"):
        cfg = tiny_config(tiny_dir, data, tmp_path / name, max_steps=16, learning_rate=3e-3, report_samples=0)
        curves.append(_losses(train(cfg)))
    a, b = curves
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    print(f"\n[gpu reproducibility] first losses {a[0]!r} {b[0]!r}; worst step rel. diff {worst:.2e}; "
          f"bit-identical curve: {a == b}")
    assert a[0] == b[0] and len(a) == 16
    assert worst < 1e-2


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_fp32_weights_train_on_cuda(tiny_dir, tmp_path, capsys, precision):
    """--compute-dtype fp32: precision auto trains in fp32; bf16 runs the fused layers under autocast."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", precision=precision, report_samples=0)
    cfg.model.compute_dtype = "fp32"
    losses = _losses(train(cfg))
    assert "fast path on: 2 of 2 decoder layers fused" in capsys.readouterr().out
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses


def test_fp16_overflow_step_is_skipped_by_the_loss_scaler(tiny_dir, tmp_path, capsys):
    """fp16 (T4/V100-class GPUs): a step whose scaled gradients overflow is skipped by the loss
    scaler — the adapter does not move on it — and the run goes on instead of stopping."""
    from transformers import TrainerCallback

    class OverflowAt(TrainerCallback):
        def __init__(self):
            self.handle, self.weights = None, {}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            p = next(p for n, p in model.named_parameters() if "lora_B" in n)
            self.weights[state.global_step] = p.detach().clone()
            if state.global_step + 1 == 3:
                self.handle = p.register_hook(lambda g: g * float("inf"))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", precision="fp16", max_steps=6, report_samples=0,
                      cuda_graphs=False)  # the hook would be captured into the graph; graphs: the next test
    cfg.model.compute_dtype = "fp16"
    watch = OverflowAt()
    run = train(cfg, callbacks=[watch])
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert len(_losses(run)) == 6
    w = watch.weights
    assert torch.equal(w[2], w[3])  # step 3 overflowed: skipped
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[3], w[4])  # the others trained


def test_qlora_recipe_fp16_dropout_on_the_fused_path_with_cuda_graphs(tiny_dir, tmp_path, capsys):
    """The classic QLoRA recipe (fp16, LoRA dropout 0.05 on q/k/v/o) runs fused and as CUDA graphs: every
    layer fused, the steps replayed, the loss falls; a step whose scaled gradients overflow (the loss
    scaler's scale pushed to 2^40 for that step, read by the graph from the scaler's own tensor) is
    skipped — the adapter does not move on it — and the others train."""
    import gc

    from transformers import TrainerCallback

    class OverflowAt(TrainerCallback):
        def __init__(self):
            self.weights, self.scaler = {}, None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            p = next(p for n, p in model.named_parameters() if "lora_B" in n)
            self.weights[state.global_step] = p.detach().clone()
            if state.global_step + 1 == 6:
                self.scaler = next(o for o in gc.get_objects() if isinstance(o, torch.amp.GradScaler))
                self.scaler._scale.fill_(2.0 ** 40)

        def on_step_end(self, args, state, control, **kwargs):
            if self.scaler is not None:
                self.scaler._scale.fill_(2.0 ** 12)
                self.scaler = None

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 16)
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", precision="fp16", max_steps=12, report_samples=0)
    cfg.model.compute_dtype = "fp16"
    cfg.lora.dropout, cfg.lora.target_modules = 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"]
    watch = OverflowAt()
    run = train(cfg, callbacks=[watch])
    out = capsys.readouterr().out
    print(out)
    assert "fast path on: 2 of 2 decoder layers fused" in out
    assert "CUDA graphs on" in out
    summary = next(line for line in out.splitlines() if "steps replayed" in line)
    replayed = int(summary.split("CUDA graphs: ")[1].split(" of ")[0])
    assert replayed >= 8, summary
    w = watch.weights
    assert torch.equal(w[5], w[6])  # step 6 overflowed: skipped by the scaler
    assert not torch.equal(w[4], w[5]) and not torch.equal(w[6], w[7])  # the others trained
    losses = _losses(run)
    # dropout on q/k/v/o only, lr 1e-2, the first step skipped (fp16's initial loss scale overflows):
    # measured 11.20 → 9.07 over 12 steps on an H200
    assert len(losses) == 12 and losses[-1] < 0.9 * losses[0], losses


def test_auto_memory_turns_on_checkpointing_when_the_estimate_does_not_fit(tiny_dir, tmp_path, capsys, monkeypatch):
    """With (pretended) almost no free GPU memory the run turns on offloaded checkpointing before
    training, says so, records it in the run's config.yaml, and trains; with auto_memory off it keeps
    the settings as given."""
    import yaml

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1, 2**40))
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", max_steps=4, report_samples=0)
    run = train(cfg)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "memory:" in x)
    assert "offloaded checkpointing turned on" in line and "may run out of memory" in line, line
    assert "checkpointed inputs of 2 layers kept in pinned host memory" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert saved["gradient_checkpointing"] is True and saved["offload_checkpoints"] is True
    assert len(_losses(run)) == 4

    cfg = tiny_config(tiny_dir, data, tmp_path / "run2", max_steps=2, report_samples=0, auto_memory=False)
    train(cfg)
    assert "[qfine] memory" not in capsys.readouterr().out
