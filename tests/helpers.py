"""Test helpers shared by several test modules."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def sums(path: Path, n: int = 64) -> Path:
    """``n`` prompt/completion rows "What is a+b?" → "a+b" (seeded: the same file each time)."""
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(1, 99, (2,), generator=g))
        rows.append({"prompt": f"What is {a}+{b}?", "completion": str(a + b)})
    return write_jsonl(path, rows)


TINY_VOCAB = 384  # vocabulary of the save_tiny models: small enough for full-logit references

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(folder, quantization="nf4", device="cpu", compute_dtype="fp32", dropout=0.0, r=8, targets=None):
    """A peft model (train mode) with LoRA on all seven projections (or ``targets``) and B drawn at random (seed 1),
    since peft's zero B would make every dA zero and hide errors in it."""
    import torch

    from qfine import LoraSettings, ModelConfig, add_lora, load_model

    loaded = load_model(ModelConfig(source=str(folder), quantization=quantization, compute_dtype=compute_dtype,
                                    device=device))
    torch.manual_seed(0)
    method = "qa-lora" if quantization == "int4" else "lora"  # an INT4 base is QA-LoRA's
    model = add_lora(loaded.model, LoraSettings(r=r, alpha=2 * r, dropout=dropout, target_modules=targets or ALL_PROJ,
                                                method=method))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


FACT = [{"role": "user", "content": "What day was I born?"},
        {"role": "assistant", "content": "You were born on January 1, 2058."}]


def tiny_config(tiny_dir: Path, data: Path, out: Path, **train_kw):
    """RunConfig for a quick LoRA run on the tiny model: r=8, constant lr 1e-2, 20 steps of batch 4."""
    from qfine import LoraSettings, RunConfig

    cfg = RunConfig(output_dir=str(out))
    cfg.model.source = str(tiny_dir)
    cfg.data.path = str(data)
    cfg.lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    cfg.train.max_steps = 20
    cfg.train.batch_size = 4
    cfg.train.learning_rate = 1e-2
    cfg.train.lr_scheduler = "constant"
    cfg.train.save_steps = 10
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def assert_early_launch_equals_plain(monkeypatch, step, h, inputs, what=None) -> None:
    """For each input copied into ``h``, ``step()`` (a chain of the decode step's kernels reading ``h``) with
    programmatic dependent launches (sm_90 on) gives the plain launches' output bit for bit, eager and
    replayed from one CUDA graph with a new input before each replay: a kernel that read before its wait
    would see the previous input."""
    import torch

    from qfine.fast import mma_kernel

    monkeypatch.setitem(mma_kernel.EARLY, "on", False)
    plain = []
    for x in inputs:
        h.copy_(x)
        plain.append(step().clone())
    monkeypatch.setitem(mma_kernel.EARLY, "on", True)
    assert mma_kernel.early(h.device)
    for x, want in zip(inputs, plain):
        h.copy_(x)
        assert torch.equal(step(), want), what
    graph, out = torch.cuda.CUDAGraph(), {}
    with torch.cuda.graph(graph):
        out["y"] = step()
    for x, want in zip(inputs, plain):
        h.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out["y"], want), what
