"""CUDA path: 4-bit training with bf16 autocast and paged 8-bit AdamW, exact merge on the GPU.

Marked ``gpu``; skipped where no CUDA device is visible (CI never has one).
"""

from __future__ import annotations

import json

import pytest
import torch

from qfine import LoraSettings, add_lora, load_model
from qfine.merge import relative_difference, save_merged
from qfine.training import train

from helpers import FACT, tiny_config, write_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

IDS = torch.tensor([[1, 17, 42, 99, 1234, 5, 77, 300]])


def test_cuda_training_bf16_paged_optimizer(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", optimizer="paged_adamw_8bit", gradient_checkpointing=True)
    run = train(cfg)
    assert "fast path on: 2 fused decoder layers" in capsys.readouterr().out  # the default on CUDA
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
