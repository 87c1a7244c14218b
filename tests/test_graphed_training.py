"""`qfine train`'s graphable training step (qfine.objectives.graphed_trainer), on CPU.

On CPU :class:`GraphedStep` runs its step eagerly, so these tests check everything but the capture:
the padding to fixed lengths is exact, and a whole training run through the graphable step gives
TRL's own step's losses and weights. The capture itself is checked on the GPU
(tests/test_gpu_fast.py::test_qfine_train_with_cuda_graphs_matches_eager).
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from helpers import TINY_VOCAB, lora_model, tiny_config, write_jsonl
from qfine import add_lora, load_model
from qfine.data import build_datasets
from qfine.fast import apply_fast_path
from qfine.objectives import objective_of
from qfine.objectives.graphed_trainer import bucket_length, pad_batch
from qfine.training.trainer import build_trainer


def test_bucket_lengths_are_a_short_ladder():
    assert [bucket_length(n, 2048) for n in (1, 512, 513, 1500, 2048)] == [512, 512, 1024, 1536, 2048]
    assert bucket_length(3000, 2048) == 3000  # beyond the top: as it is
    # quarters of 100 rounded up to 64, never above the top
    assert [bucket_length(n, 100) for n in (30, 64, 65, 100)] == [64, 64, 100, 100]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("fast", [False, True])
def test_padding_to_a_bucket_without_the_mask_is_exact(tmp_path, save_tiny, fast):
    """Right-padded rows of different lengths: padding further and dropping the mask changes neither
    the loss nor any LoRA gradient (fails if pads carried loss or real tokens attended to them)."""
    model = lora_model(save_tiny(tmp_path / "m"))
    if fast:
        assert apply_fast_path(model).layers == 2
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, TINY_VOCAB, (3, 20), generator=g)
    lengths = torch.tensor([20, 13, 7])
    mask = (torch.arange(20)[None] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :3] = -100
    ids = torch.where(mask.bool(), ids, 0)
    ref_loss, ref_grads = _loss_and_grads(model, dict(input_ids=ids, labels=labels, attention_mask=mask))
    padded = pad_batch(dict(input_ids=ids, labels=labels, attention_mask=mask), 32, pad_id=0, drop_mask=True)
    assert set(padded) == {"input_ids", "labels"} and padded["input_ids"].shape == (3, 32)
    loss, grads = _loss_and_grads(model, padded)
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    assert max(_rel(a, b) for a, b in zip(grads, ref_grads)) < 1e-5


def test_padding_a_packed_row_is_exact(tmp_path, save_tiny):
    """A padding-free row (documents marked by restarting position_ids) padded with position 0 pads."""
    model = lora_model(save_tiny(tmp_path / "m"))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, TINY_VOCAB, (1, 30), generator=g)
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    labels = ids.clone()
    labels[pos == 0] = -100
    ref_loss, ref_grads = _loss_and_grads(model, dict(input_ids=ids, labels=labels, position_ids=pos))
    padded = pad_batch(dict(input_ids=ids, labels=labels, position_ids=pos), 48, pad_id=0, drop_mask=False)
    assert padded["position_ids"][0, 30:].eq(0).all() and padded["labels"][0, 30:].eq(-100).all()
    loss, grads = _loss_and_grads(model, padded)
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    assert max(_rel(a, b) for a, b in zip(grads, ref_grads)) < 1e-5


def _run(tiny_dir, data, out, graphed: bool):
    """Four optimizer steps (batch 2, accumulation 2) on the tiny model; (losses, LoRA weights, step inputs)."""
    # SGD: Adam's first steps move every weight by ±lr whatever the gradient's size, so rounding-level
    # gradient differences near zero would show up as lr-sized weight differences
    cfg = tiny_config(tiny_dir, data, out, max_steps=4, batch_size=2, grad_accum=2, save_steps=100,
                      report_samples=0, optimizer="sgd", learning_rate=0.5)
    cfg.data.max_seq_len = 96
    cfg.model.compute_dtype = "fp32"  # (the tiny model is stored in bf16: LoRA weights would follow it)
    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    model = add_lora(loaded.model, cfg.lora, False)
    for name, p in model.named_parameters():  # B drawn at random: with peft's zero B the first dB are
        if "lora_B" in name:                   # tiny differences of large terms (rounding-dominated)
            torch.nn.init.normal_(p, std=0.05)
    apply_fast_path(model)  # the fused layers and loss, run eagerly on CPU
    train_ds, _, _ = build_datasets(loaded.tokenizer, cfg.data, cfg.train.seed)
    grads = GradsAtStep()
    trainer = build_trainer(objective_of(cfg), model, loaded.tokenizer, train_ds, None, cfg, out, "cpu",
                            callbacks=[grads])
    probe = {"input_ids": torch.ones(2, 5, dtype=torch.long)}  # the cached parameter count gives Trainer's flops
    assert trainer.floating_point_ops(probe) == SFTTrainer.floating_point_ops(trainer, probe) > 0
    # TRL casts a quantized model's adapters to bf16; build_trainer keeps them in fp32
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    seen = []
    if graphed:
        assert "CUDA graphs on" in trainer.enable_cuda_graphs(cfg.data.max_seq_len)
        fn = trainer.graphed.fn
        trainer.graphed.fn = lambda **b: seen.append({k: tuple(v.shape) if torch.is_tensor(v) else v
                                                       for k, v in b.items()}) or fn(**b)
    else:  # the reference clips, measures and counts tokens as Trainer itself does
        for name in ("_clip_grad_norm", "_get_grad_norm", "_track_num_input_tokens"):
            setattr(trainer, name, functools.partial(getattr(SFTTrainer, name), trainer))
    # the reference is TRL's own loop and step (with Module.zero_grad); the graphed run is qfine's
    trainer.train() if graphed else SFTTrainer.train(trainer)
    assert "zero_grad" not in vars(model)  # qfine's per-run zero_grad is gone with the run
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    weights = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    logged = [(r["grad_norm"], r["num_input_tokens_seen"]) for r in trainer.state.log_history if "loss" in r]
    return losses, grads.first, weights, seen, logged + [trainer.state.num_input_tokens_seen]


class GradsAtStep(TrainerCallback):
    """Keeps the gradients the optimizer sees at its first step (accumulated over the micro-batches)."""

    first = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.first is None:
            self.first = [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_graphable_step_trains_like_trls_step(tmp_path, tiny_dir):
    """The whole run through the graphable step (bucketed padding, no mask, device-tensor divisor,
    eager on CPU) against TRL's step on the same data: same losses and weights to fp32 rounding."""
    from helpers import FACT

    rows = [{"messages": [FACT[0], {"role": "assistant", "content": "Day " + "and night " * (i % 5)}]}
            for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    ref_losses, ref_grads, ref_weights, _, ref_logged = _run(tiny_dir, data, tmp_path / "ref", graphed=False)
    losses, grads, weights, seen, logged = _run(tiny_dir, data, tmp_path / "graphed", graphed=True)
    assert len(seen) == 8  # every micro-batch went through the graphable step
    assert all(set(s) == {"input_ids", "labels", "num_items", "accumulation"} for s in seen)
    assert {s["input_ids"][1] for s in seen} <= {bucket_length(n, 96) for n in range(1, 97)}
    assert len(losses) == len(ref_losses) == 4
    assert max(abs(a - b) / b for a, b in zip(losses, ref_losses)) < 1e-5, (losses, ref_losses)
    assert max(_rel(a, b) for a, b in zip(grads, ref_grads)) < 1e-5
    assert max(_rel(a, b) for a, b in zip(weights, ref_weights)) < 1e-5
    # clipping/norm over the trainable list and the device-side token count log what Trainer's own do
    assert len(logged) == 5 and logged[-1] == ref_logged[-1] == logged[-2][1] > 0
    assert [t for _, t in logged[:-1]] == [t for _, t in ref_logged[:-1]]
    assert max(abs(g - r) / r for (g, _), (r, _) in zip(logged[:-1], ref_logged[:-1])) < 1e-5
