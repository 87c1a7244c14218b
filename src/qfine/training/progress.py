"""What a training run prints: a progress bar with its ETA on a terminal, one compact line per logging
step, one per evaluation, and a summary at the end (:func:`summary`).

It replaces transformers' own progress callback, which prints each log as a raw dictionary and
draws a nested evaluation bar that leaves cursor codes (``\\x1b[A``) in a log file. Off a terminal
(a log file, CI, a pipe) no bar is drawn: only the lines.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm
from transformers import TrainerCallback


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _num(v: float) -> str:
    """A loss-like value in 4 significant digits, tiny ones in e-notation."""
    return f"{v:.3e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4g}"


def _preference(logs: dict, prefix: str) -> list[str]:
    """A preference step's reward accuracy (%) and margin, or a GRPO step's mean reward, when logged."""
    out = []
    if isinstance(logs.get(prefix + "rewards/accuracies"), (int, float)):
        out.append(f"pref acc {100 * logs[prefix + 'rewards/accuracies']:.0f}%")
    if isinstance(logs.get(prefix + "rewards/margins"), (int, float)):
        out.append(f"margin {_num(logs[prefix + 'rewards/margins'])}")
    if isinstance(logs.get(prefix + "reward"), (int, float)):  # GRPO: the rollouts' mean reward, its spread
        out.append(f"reward {logs[prefix + 'reward']:.3f} ± {logs.get(prefix + 'reward_std', 0.0):.3f}")
    return out


class ConsoleProgress(TrainerCallback):
    """A tqdm bar over the optimizer steps (terminals only) and a line per log event.

    ``out``: where lines go (stdout); the bar draws on stderr. ``tty``: draw the bar (default: when
    stderr is a terminal). ``metric``: the eval metric whose best value is marked.
    """

    def __init__(self, out: TextIO | None = None, tty: bool | None = None, metric: str = "eval_loss"):
        self.out, self.metric = out, metric
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        self.eval_bar = None
        self.best: float | None = None
        self._start: tuple[float, int] = (0.0, 0)

    def _write(self, line: str) -> None:
        out = self.out or sys.stdout
        if self.bar is not None:
            tqdm.write(line, file=out)  # clears the bar, writes the line, redraws the bar
        else:
            out.write(line + "\n")
        out.flush()

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), state.global_step)
        if state.is_world_process_zero and self.tty:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True,
                            leave=False, file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bar is None or eval_dataloader is None or not hasattr(eval_dataloader, "__len__"):
            return
        if self.eval_bar is None:
            self.eval_bar = tqdm(total=len(eval_dataloader), desc="eval", leave=False, dynamic_ncols=True,
                                 file=sys.stderr, position=1)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def eta(self, state) -> str:
        """Time left at the pace of this call's steps so far."""
        t0, step0 = self._start
        done = state.global_step - step0
        if done <= 0 or state.max_steps <= 0:
            return "?"
        return duration((time.perf_counter() - t0) / done * max(0, state.max_steps - state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        width = len(str(state.max_steps))
        where = f"step {state.global_step:>{width}}/{state.max_steps}"
        if "loss" in logs:
            parts = [where, f"loss {_num(logs['loss'])}"]
            if isinstance(logs.get("learning_rate"), (int, float)):
                parts.append(f"lr {logs['learning_rate']:.2e}")
            if isinstance(logs.get("grad_norm"), (int, float)):
                parts.append(f"grad {_num(logs['grad_norm'])}")
            parts += _preference(logs, "")
            if isinstance(logs.get("tokens_per_s"), (int, float)):
                parts.append(f"{logs['tokens_per_s']:,.0f} tok/s")
            if isinstance(logs.get("peak_gpu_mem_gib"), (int, float)):
                parts.append(f"{logs['peak_gpu_mem_gib']:.1f} GiB")
            parts.append(f"eta {self.eta(state)}")
            self._write("  ".join(parts))
        elif any(k.startswith("eval_") for k in logs):
            value = logs.get(self.metric)
            parts = [where, "eval"]
            for key in ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1_macro"):
                if isinstance(logs.get(key), (int, float)) and math.isfinite(logs[key]):
                    parts.append(f"{key[5:].replace('_', ' ')} {_num(logs[key])}")
            parts += _preference(logs, "eval_")
            if isinstance(value, (int, float)):
                lower = "loss" in self.metric
                if self.best is None or (value < self.best if lower else value > self.best):
                    self.best = value
                    parts.append("(best so far)")
            self._write("  ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class Outcome:
    """How a run ended, for the summary: steps, losses, the best evaluation, and whose adapter was kept."""

    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    best_metric: float | None  # eval loss of the best evaluation (None without eval data)
    best_step: int | None
    adapter_step: int  # the step whose adapter became RUN_DIR/adapter
    adapter_why: str  # "the best eval loss" / "the last step"


def outcome(state, seconds: float, load_best: bool) -> Outcome:
    """Read a finished Trainer state: the best evaluation, and which step's adapter the run keeps
    (with load_best, the checkpoint transformers reloaded at the end; else the last step)."""
    losses = [r["loss"] for r in state.log_history if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in state.log_history if isinstance(r.get("eval_loss"), (int, float))]
    best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
    kept, why = state.global_step, "the last step"
    if load_best and state.best_model_checkpoint:
        tail = Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1]
        if tail.isdigit():
            kept, why = int(tail), "the best eval loss"
    return Outcome(state.global_step, seconds, losses[0] if losses else None, losses[-1] if losses else None,
                   best["eval_loss"] if best else None, best["step"] if best else None, kept, why)


def summary(o: Outcome, run_dir: Path, prompt: str | None = None) -> list[str]:
    """The lines printed when training ends: what happened, which adapter was kept, what to run next."""
    lines = [f"done: {o.steps} steps in {duration(o.seconds)}"
             + (f"; train loss {_num(o.first_loss)} → {_num(o.last_loss)}" if o.first_loss is not None else "")]
    if o.best_metric is not None:
        lines.append(f"best eval loss {_num(o.best_metric)} at step {o.best_step}")
    lines.append(f"adapter: step {o.adapter_step}'s ({o.adapter_why}) in {run_dir / 'adapter'}")
    if o.best_step is not None and o.best_step != o.adapter_step and o.adapter_why == "the last step":
        lines.append(f"  (the best evaluation, step {o.best_step}, had no checkpoint: "
                     + ("it was the untrained start)" if o.best_step == 0 else "see train.load_best)"))
    run = shlex.quote(str(run_dir))
    ask = shlex.quote(prompt or "Hello!")
    lines += ["next:",
              f"  qfine generate {run} --prompt {ask}",
              f"  qfine chat {run}",
              f"  qfine merge {run} --out {shlex.quote(str(run_dir) + '-merged')}",
              f"  qfine export {run} --quant q4_k_m --out {shlex.quote(str(run_dir) + '.gguf')}",
              f"  report: {run_dir / 'report.html'}"]
    return lines
