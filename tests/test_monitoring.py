"""Monitoring: eval during training, best checkpoint, NaN guard, TensorBoard scalars, report.html."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from helpers import FACT, tiny_config, write_jsonl
from qfine.training import train
from qfine.util.errors import QfineError


def _cfg(tiny_dir, tmp_path, **train_kw):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    return tiny_config(tiny_dir, data, tmp_path / "run", **{"max_steps": 12, "save_steps": 4, "report_samples": 1,
                                                              **train_kw})


class PoisonAt(TrainerCallback):
    """Set one LoRA weight to NaN at the start of step ``step`` (1-based)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))


def test_nan_stops_training_and_keeps_last_good_checkpoint(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = _cfg(tiny_dir, tmp_path)
    with pytest.raises(QfineError, match=r"non-finite gradient at step 6.*checkpoint-4"):
        train(cfg, callbacks=[PoisonAt(6)])
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]
    weights = load_file(run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (run / "adapter").exists()  # no adapter from the bad step
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 5
    assert "stopped: non-finite gradient at step 6" in (run / "report.html").read_text()


@pytest.mark.parametrize("logging_steps", [1, 100])
def test_deferred_nan_verdict_still_stops_before_any_log_or_save(tiny_dir, tmp_path, monkeypatch, logging_steps):
    """As on CUDA, the guard reads each step's verdict late (before the next log/save/step): the run
    still stops naming step 6, with no log line or checkpoint written from it."""
    from qfine.training.callbacks import NonFiniteGuard

    monkeypatch.setattr(NonFiniteGuard, "defer", True)
    seen = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(state.global_step + 1)

    cfg = _cfg(tiny_dir, tmp_path, logging_steps=logging_steps)  # checkpoints every 4 steps
    cfg.data.path = str(write_jsonl(tmp_path / "d48.jsonl", [{"messages": FACT}] * 48))  # one epoch: no epoch end
    with pytest.raises(QfineError, match=r"non-finite gradient at step 6.*checkpoint-4"):
        train(cfg, callbacks=[PoisonAt(6), Steps()])
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (run / "adapter").exists()
    metrics = (run / "metrics.jsonl")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
    # logging every step: read before step 6's log line; otherwise once step 7 has run (at its optimizer step)
    assert max(steps, default=0) == (5 if logging_steps == 1 else 0)
    assert max(seen) == (6 if logging_steps == 1 else 7)


def test_eval_best_checkpoint_and_scalars(tiny_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tiny_dir, tmp_path)
    cfg.data.eval_path = cfg.data.path
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert all(abs(r["eval_perplexity"] - torch.tensor(r["eval_loss"]).exp().item()) < 1e-3 * r["eval_perplexity"]
               for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    state = json.loads((run / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    best = min(evals[1:], key=lambda r: r["eval_loss"])
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "eval/loss",
            "eval/perplexity"} <= tags, tags


def test_report_html_is_self_contained(tiny_dir, tmp_path):
    run = train(_cfg(tiny_dir, tmp_path, max_steps=6, save_steps=6))
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # loss, lr, grad norm (+ throughput)
    assert "src='http" not in page and "<script" not in page and "<link" not in page
    assert "Sample answers" in page and "What day was I born?" in page
    assert "trainable parameters" in page and "tokens/s" in page
    assert "max_steps: 6" in page


def test_early_stopping_without_improvement(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path, max_steps=20, save_steps=2, eval_steps=2, learning_rate=0.0,
               early_stopping_patience=2, report_samples=0)
    cfg.data.eval_path = cfg.data.path
    run = train(cfg)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # lr 0: the eval loss never improves on the first checkpoint's, so training stops 2 evaluations later
    assert max(steps) == 6, steps


def test_fp16_overflow_steps_are_skipped_not_fatal():
    """With fp16's loss scaler a non-finite gradient is an overflow the scaler skips: counted, and
    fatal only after `patience` in a row; without a scaler the first one stops the run."""
    from transformers import TrainerControl, TrainerState

    from qfine.training.callbacks import NonFiniteError, NonFiniteGuard

    model = torch.nn.Linear(3, 2)
    state, control = TrainerState(), TrainerControl()

    def step(guard, finite):
        model.weight.grad = torch.full_like(model.weight, 1.0 if finite else float("inf"))
        guard.on_pre_optimizer_step(None, state, control, model=model)
        state.global_step += 1

    scaled = NonFiniteGuard(loss_scaled=True, patience=3)
    scaled.defer = False
    scaled.on_train_begin(None, state, control, model=model)
    for finite in (True, False, False, True, False, False):
        step(scaled, finite)
    assert scaled.skipped == [2, 3, 5, 6]
    scaled.on_log(None, state, control, logs={"loss": float("inf")})  # an overflowed step's log is no stop
    with pytest.raises(NonFiniteError, match=r"non-finite gradient \(3 consecutive steps skipped by the fp16 loss scaler.*at step 7"):
        step(scaled, False)

    plain = NonFiniteGuard()
    plain.defer = False
    plain.on_train_begin(None, state, control, model=model)
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 7"):
        step(plain, False)


def test_the_best_evaluation_becomes_the_adapter_even_when_save_steps_exceed_the_run(tiny_dir, tmp_path, capsys):
    """Evaluations every 5 steps, checkpoints every 100, 15 steps: transformers can only reload a best
    evaluation that has a checkpoint, so each improving evaluation must write one; the adapter, the
    report and the summary then name the same step."""
    from safetensors.torch import load_file

    from helpers import write_jsonl as rows_to

    cfg = _cfg(tiny_dir, tmp_path, max_steps=15, save_steps=100, eval_steps=5, learning_rate=3e-2)
    cfg.data.eval_path = str(rows_to(tmp_path / "other.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                      {"role": "assistant", "content": f"{2 * a}"}]} for a in range(8)]))
    run = train(cfg)
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [0, 5, 10, 15]
    best = min((s for s in evals if s > 0), key=evals.get)
    print(f"\n[best] eval losses {evals}; best trained step {best}")
    ckpt = run / "checkpoints" / f"checkpoint-{best}"
    assert ckpt.is_dir(), sorted(p.name for p in (run / "checkpoints").iterdir())
    kept, saved = load_file(ckpt / "adapter_model.safetensors"), load_file(run / "adapter" / "adapter_model.safetensors")
    assert kept.keys() == saved.keys() and all(torch.equal(kept[k], saved[k]) for k in kept)
    assert f"adapter: step {best}'s (the best eval loss)" in out, out
    assert f"step {best} (" in (run / "report.html").read_text()
