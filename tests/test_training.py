"""Training on a tiny random Llama in 4-bit: loss falls; adapters reload to identical logits."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import FACT, tiny_config, write_jsonl
from qfine import LoraSettings, add_lora, load_adapter, load_model
from qfine.training import train
from qfine.training.rundir import save_adapter


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(tmp / "fact.jsonl", [{"messages": FACT}] * 8)
    return train(tiny_config(tiny_dir, data, tmp / "run"))


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_loss_falls(tiny_run):
    losses = _losses(tiny_run)
    assert len(losses) == 20
    # A random 2-layer model memorising one reply: the loss must at least halve in 20 steps.
    assert losses[-1] < 0.5 * losses[0], losses


def test_run_dir_layout(tiny_run):
    assert (tiny_run / "adapter" / "adapter_config.json").is_file()
    assert (tiny_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (tiny_run / "adapter" / "tokenizer_config.json").is_file()
    assert (tiny_run / "checkpoints" / "checkpoint-20").is_dir()
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    step_rows = [m for m in metrics if "loss" in m]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(step_rows[0])
    assert step_rows[0]["tokens_per_s"] > 0
    # config.yaml is re-runnable: it parses back to the same config
    from qfine.config import load_yaml, to_dict
    again = load_yaml(tiny_run / "config.yaml")
    assert to_dict(again)["train"]["max_steps"] == 20 and again.model.source.endswith("tiny-llama")


def test_plain_peft_loads_saved_adapter(tiny_run, tiny_dir):
    """PeftModel.from_pretrained on the saved adapter gives the same logits as qfine's loader."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir)
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])

    loaded = load_model(str(tiny_dir))
    ours = load_adapter(loaded.model, tiny_run / "adapter").eval()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=loaded.compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], quantization_config=bnb,
                                                dtype=loaded.compute_dtype, device_map={"": loaded.device})
    for m in base.modules():  # the bitsandbytes CPU trap applies to plain peft users too
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    plain = PeftModel.from_pretrained(base, str(tiny_run / "adapter")).eval()
    with torch.no_grad():
        a, b = ours(ids.to(ours.device)).logits, plain(ids.to(plain.device)).logits
    assert torch.equal(a, b)
    with torch.no_grad(), plain.disable_adapter():
        base_logits = plain(ids.to(plain.device)).logits
    assert (a - base_logits).abs().max() > 1e-3  # the adapter does change the model


def test_adapter_roundtrip_identical_logits(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir))
    model = add_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "down_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.tensor([[1, 17, 42, 99, 1234]])
    model.eval()
    with torch.no_grad():
        expected = model(ids.to(model.device)).logits
    save_adapter(model, loaded.tokenizer, tmp_path / "adapter", loaded.source)
    fresh = load_adapter(load_model(str(tiny_dir)).model, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = fresh(ids.to(fresh.device)).logits
    assert torch.equal(expected, got)


def test_resume_continues_from_checkpoint(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 4)
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", max_steps=10, save_steps=5)
    run = train(cfg)
    cfg.train.max_steps = 15
    train(cfg, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    # resume picks the newest checkpoint (10) and continues with steps 11..15
    assert steps[-5:] == [11, 12, 13, 14, 15]
    assert (run / "checkpoints" / "checkpoint-15").is_dir()


def test_every_module_trains_in_training_mode(tiny_dir, tmp_path):
    """from_pretrained leaves the model in eval mode and peft's fresh wrappers start in training mode;
    Trainer only calls train() on a model whose top-level flag is off, so without qfine's own
    ``model.train()`` the inner layers stayed in eval mode when no samples were generated before
    training: no LoRA dropout, and on CUDA the reference layers and loss instead of the fused ones."""
    from transformers import TrainerCallback

    class Modes(TrainerCallback):
        seen: list = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.seen.append(sum(not m.training for m in model.modules()))

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    watch = Modes()
    train(tiny_config(tiny_dir, data, tmp_path / "run", max_steps=2, report_samples=0), callbacks=[watch])
    assert watch.seen == [0, 0], watch.seen  # modules in eval mode at each step
