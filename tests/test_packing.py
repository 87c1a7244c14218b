"""Packing: several examples per row with restarting positions; attention never crosses them."""

from __future__ import annotations

import torch

from helpers import write_jsonl
from qfine import LoraSettings, RunConfig, add_lora, load_model
from qfine.data.pipeline import build_datasets
from qfine.objectives import objective_of
from qfine.training.trainer import build_trainer


def test_packed_logits_equal_logits_alone(tiny_dir):
    model = load_model(str(tiny_dir), quantization="none", device="cpu").model.eval()
    a = torch.tensor([[1, 50, 60, 70, 80, 90, 2]])
    b = torch.tensor([[1, 500, 600, 700, 2]])
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
    with torch.no_grad():
        alone_a, alone_b = model(a).logits, model(b).logits
        got = model(input_ids=packed, position_ids=pos).logits
        leaky = model(input_ids=packed).logits  # the same row without restarting positions: b sees a
    assert torch.allclose(got[:, : a.shape[1]], alone_a, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got[:, a.shape[1]:], alone_b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaky[:, a.shape[1]:], alone_b, atol=1e-3)


def test_trainer_packs_into_padding_free_batches(tiny_dir, tmp_path):
    rows = [{"prompt": "p" * (i + 1), "completion": "c" * (3 + i % 4)} for i in range(12)]
    cfg = RunConfig(output_dir=str(tmp_path / "run"))
    cfg.model.source = str(tiny_dir)
    cfg.data.path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    cfg.data.packing = True
    cfg.data.max_seq_len = 128
    cfg.train.max_steps = 1
    cfg.train.batch_size = 2
    loaded = load_model(cfg.model)
    train_ds, _, stats = build_datasets(loaded.tokenizer, cfg.data)
    model = add_lora(loaded.model, LoraSettings(r=2))
    trainer = build_trainer(objective_of(cfg), model, loaded.tokenizer, train_ds, None, cfg, tmp_path / "run", "cpu")
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # one flat padding-free row
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    assert len(starts) >= 3  # several examples in the row, each restarting at position 0
    # every label-bearing token is a completion token: the loss mask survived packing
    assert (batch["labels"] != -100).sum() > 0
    assert len(trainer.train_dataset) < stats.rows  # rows were packed together


def test_group_by_length_batches_similar_lengths(tiny_dir, tmp_path):
    rows = [{"prompt": "word " * (1 + (i * 7) % 40), "completion": "ok"} for i in range(64)]
    cfg = RunConfig(output_dir=str(tmp_path / "run"))
    cfg.model.source = str(tiny_dir)
    cfg.data.path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    cfg.train.batch_size = 4
    loaded = load_model(cfg.model)
    model = add_lora(loaded.model, LoraSettings(r=2))

    def spread(group: bool) -> float:
        cfg.data.group_by_length = group
        train_ds, _, _ = build_datasets(loaded.tokenizer, cfg.data)
        trainer = build_trainer(objective_of(cfg), model, loaded.tokenizer, train_ds, None, cfg, tmp_path / "run", "cpu")
        widths = []
        for batch in trainer.get_train_dataloader():
            lengths = (batch["attention_mask"].sum(1)).tolist()
            widths.append(max(lengths) - min(lengths))
        return sum(widths) / len(widths)

    # grouped batches hold sequences of similar length: far less padding than random batches
    assert spread(True) < 0.5 * spread(False)
