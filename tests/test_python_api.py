"""docs/python-api.md's example on the tiny model: every public name does what the page says."""

from __future__ import annotations

import copy
import subprocess
import sys

import torch

import qfine
from helpers import FACT, write_jsonl
from qfine.util.compare import relative_difference


def test_import_qfine_is_cheap():
    out = subprocess.run([sys.executable, "-c", "import sys, qfine; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_documented_example_runs_end_to_end(tiny_dir, tmp_path):
    loaded = qfine.load_model(str(tiny_dir), quantization="nf4")
    model = qfine.add_lora(loaded.model, qfine.LoraSettings(r=4))
    assert 0 < sum(p.numel() for p in model.parameters() if p.requires_grad) < 100_000

    cfg = qfine.RunConfig(output_dir=str(tmp_path / "run"))
    cfg.model.source = str(tiny_dir)
    cfg.data.path = str(write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8))
    cfg.train.max_steps, cfg.train.learning_rate, cfg.train.report_samples = 12, 1e-2, 0
    before = copy.deepcopy(cfg)
    run_dir = qfine.train(cfg)
    assert cfg == before  # the caller's config is left as it was
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    run = qfine.load_run(run_dir)
    reply = qfine.generate(run, FACT[0]["content"], max_new_tokens=8)
    assert isinstance(reply, str) and reply

    ids = torch.tensor([[1, 17, 42, 99, 123]], device=run.model.device)
    with torch.no_grad():
        adapted = run.model(ids).logits
        with qfine.merged(run.model):
            merged = run.model(ids).logits
        again = run.model(ids).logits
    # the exact merge computes what base + adapter computes, up to the compute dtype's rounding (bf16 on a GPU)
    tolerance = 1e-5 if adapted.dtype == torch.float32 else 3e-2
    assert relative_difference(merged, adapted) < tolerance
    assert torch.equal(again, adapted)  # and the adapters came back after the block

    done = qfine.merge(run_dir, tmp_path / "merged", dtype="fp32")
    assert (done.out / "config.json").is_file() and done.form == "fp32"
    report = qfine.export_gguf(run_dir, tmp_path / "m.gguf", "f16", check=False)
    assert (tmp_path / "m.gguf").stat().st_size > 0 and report.tensors

    text = qfine.plan(cfg, gpu_memory="24GiB")
    assert "24.0 GiB" in text and "fits" in text
