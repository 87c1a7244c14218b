"""Time a sweep spends between trials, and after a trial interrupted by Ctrl-C in the same process.

Between two trials: ``idle`` is the wall time from one trial's ``on_train_end`` to the next one's
``on_train_begin`` (saving the adapter, the report, releasing the adapter and the data-loader
workers, telling and asking optuna, tokenizing, adding a fresh adapter and the fast path), and
``to_step`` runs on to the next trial's first optimizer step (adding the evaluation before training
and the first step's own time). Two phases in one process:

1. a sweep of ``--trials`` trials;
2. a sweep interrupted by KeyboardInterrupt at step 3 of its second trial (what a notebook's Ctrl-C
   raises), then the same sweep again in the same process (the case whose teardown once stalled
   joining CUDA-side data-loader workers): the time from the interrupt to the exception reaching
   the caller, and the gaps of the continued sweep.

    python bench/sweep_gaps.py --out /tmp/gaps.json [--tokenizer DIR] [--trials 4] [--steps 40]

A tiny Llama (hidden 256, 4 layers) is built in code; the tokenizer comes from ``--tokenizer`` or
the bundled model. Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback

import qfine.sweep as sw
from qfine import LoraSettings, RunConfig


def _model(folder: Path, tokenizer: str) -> Path:
    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _config(model: Path, data: Path, out: Path, steps: int) -> RunConfig:
    cfg = RunConfig(output_dir=str(out))
    cfg.model.source = str(model)
    cfg.data.path = str(data)
    cfg.data.eval_ratio = 0.25
    cfg.lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    cfg.train.max_steps = steps
    cfg.train.batch_size = 4
    cfg.train.eval_steps = steps // 4
    cfg.train.save_steps = steps
    cfg.train.report_samples = 0
    return cfg


class Clock(TrainerCallback):
    """Records (trial, event, time): 'begin' at train begin, 'first' at step 1's end, 'end' at train end."""

    events: list = []
    interrupt_trial: int | None = None
    interrupted_at: float | None = None

    def __init__(self, number: int):
        self.number = number

    def on_train_begin(self, args, state, control, **kwargs):
        Clock.events.append((self.number, "begin", time.perf_counter()))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            Clock.events.append((self.number, "first", time.perf_counter()))
        if self.number == Clock.interrupt_trial and state.global_step == 3:
            Clock.interrupted_at = time.perf_counter()
            raise KeyboardInterrupt

    def on_train_end(self, args, state, control, **kwargs):
        Clock.events.append((self.number, "end", time.perf_counter()))


def _gaps() -> dict[str, list[float]]:
    """Seconds from each trial's end to the next trial's train begin (idle) and first step (to_step)."""
    idle, to_step, last_end = [], [], None
    for _, kind, t in Clock.events:
        if kind == "begin" and last_end is not None:
            idle.append(round(t - last_end, 3))
        elif kind == "first" and last_end is not None:
            to_step.append(round(t - last_end, 3))
            last_end = None
        elif kind == "end":
            last_end = t
    return {"idle": idle, "to_step": to_step}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    if a.tokenizer is None:
        from qfine.models.sources import bundled_gguf_path, gguf_to_folder

        a.tokenizer = str(gguf_to_folder(bundled_gguf_path()))
    tmp = Path(tempfile.mkdtemp(prefix="sweep-gaps-"))
    model = _model(tmp / "model", a.tokenizer)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(256)]
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump({"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                     "lora.r": [4, 8, 16]}))
    real = sw._pruning_callback

    def timed(trial, metric):
        cb = real(trial, metric)
        clock = Clock(trial.number)
        cb.on_train_begin, cb.on_step_end, cb.on_train_end = clock.on_train_begin, clock.on_step_end, clock.on_train_end
        return cb

    sw._pruning_callback = timed
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "trials": a.trials, "steps": a.steps}
    t0 = time.perf_counter()
    sw.sweep(_config(model, data, tmp / "sweep1", a.steps), str(space), trials=a.trials, metric="eval_loss",
             pruner="none")
    result["sweep_s"] = round(time.perf_counter() - t0, 2)
    result["gaps_s"] = _gaps()

    Clock.events, Clock.interrupt_trial = [], 1
    try:
        sw.sweep(_config(model, data, tmp / "sweep2", a.steps), str(space), trials=a.trials, pruner="none")
    except KeyboardInterrupt:
        result["interrupt_to_caller_s"] = round(time.perf_counter() - Clock.interrupted_at, 3)
    Clock.events, Clock.interrupt_trial = [], None
    t0 = time.perf_counter()
    sw.sweep(_config(model, data, tmp / "sweep2", a.steps), str(space), trials=a.trials, pruner="none")
    result["continued_sweep_s"] = round(time.perf_counter() - t0, 2)
    result["continued_gaps_s"] = _gaps()
    text = json.dumps(result)
    print(text)
    Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
