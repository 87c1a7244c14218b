"""Trainer callbacks: metrics.jsonl (+ tokens/s, perplexity, peak GPU memory) and the NaN/inf guard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from qfine.compat.torch import foreach_norm, set_last_lr


class MetricsJsonl(TrainerCallback):
    """Append one JSON line per log event to ``path``: step, loss, lr, grad_norm, tokens_per_s, ...

    It also adds to the log dict, before TensorBoard (registered after it) writes it:
    ``tokens_per_s`` — non-padding input tokens seen between two training logs over the wall time
    between them; ``eval_perplexity`` = exp(eval_loss); ``peak_gpu_mem_gib`` on CUDA.
    """

    def __init__(self, path: str | Path, perplexity: bool = True):
        self.path, self.perplexity = Path(path), perplexity  # perplexity: off where the loss is per row (seq-cls)
        self._last = (None, 0)  # (time, tokens) at the previous training log

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        then, seen = self._last
        if "loss" in logs and then is not None and now > then:
            logs["tokens_per_s"] = round((tokens - seen) / (now - then), 1)
            self._last = (now, tokens)
        if self.perplexity and "eval_loss" in logs and math.isfinite(logs["eval_loss"]):
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        if torch.cuda.is_available():
            logs["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if not state.is_world_process_zero:  # a launched job's rank 0 writes the file (logs are all-reduced)
            return
        row = {"step": state.global_step, "epoch": state.epoch}
        rename = {"learning_rate": "lr"}
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not k.startswith("total_flos"):
                row[rename.get(k, k)] = v if (not isinstance(v, float) or math.isfinite(v)) else str(v)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class NonFiniteError(RuntimeError):
    """Raised by :class:`NonFiniteGuard`; ``step`` is the optimizer step (1-based) that went bad."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


class NonFiniteGuard(TrainerCallback):
    """Stop at the first non-finite loss or gradient before anything is logged or saved from it.

    The gradients of the trainable parameters (the LoRA weights — cheap) are tested on the device in
    ``on_pre_optimizer_step``; the host reads the verdict only when it must: before a step that logs,
    saves, evaluates or ends the run (``on_step_end``, epoch and train end), and otherwise at the next
    optimizer step, once that step's forward and backward are already queued. Reading it at once
    drains the GPU's queue every step, and the GPU then idles while the host prepares the next step
    (see docs/benchmarks.md). So on CUDA a bad step's update may reach the weights in memory, but
    never a log line, a checkpoint or the adapter: the run stops with that step's number, and every
    checkpoint written so far is intact. On CPU the verdict is read at once, before the optimizer
    applies the step (there is no queue to keep full).

    With fp16's loss scaler (``loss_scaled``) a non-finite gradient is an overflow of the scaled loss:
    the scaler skips that optimizer step and lowers the scale, which is how fp16 training is meant to
    go, so such a step is counted (``skipped``), not fatal. The run stops only after ``patience``
    consecutive skipped steps (the scale then keeps falling and nothing trains).
    """

    _params: list | None = None
    _pending: tuple[int, torch.Tensor] | None = None  # (1-based step, all gradients finite) not yet read
    defer: bool | None = None  # read verdicts late: None = on CUDA only

    def __init__(self, loss_scaled: bool = False, patience: int = 10):
        self.loss_scaled, self.patience = loss_scaled, patience
        self.skipped: list[int] = []  # steps the loss scaler skipped (fp16 overflow)
        self._run = 0  # consecutive skipped steps

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # the trainable parameters, listed once: walking the model's ~1,000s of modules every step
        # costs milliseconds of host time the GPU waits for
        self._params = [p for p in model.parameters() if p.requires_grad] if model is not None else None
        self._pending = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.check()
        params = self._params if self._params is not None else list(model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            # a gradient's norm is finite exactly when all its entries are: one reduction for all
            self._pending = (state.global_step + 1, torch.isfinite(torch.stack(foreach_norm(grads))).all())
            if not (grads[0].is_cuda if self.defer is None else self.defer):
                self.check()

    def check(self) -> None:
        """Read the pending verdict (a host sync on CUDA); raise :class:`NonFiniteError` if it is bad."""
        if self._pending is None:
            return
        step, ok = self._pending
        self._pending = None
        if bool(ok):
            self._run = 0
            return
        if not self.loss_scaled:
            raise NonFiniteError(step, "gradient")
        self.skipped.append(step)
        self._run += 1
        if self._run >= self.patience:
            raise NonFiniteError(step, f"gradient ({self._run} consecutive steps skipped by the fp16 loss scaler: "
                                       "the loss itself overflows or diverges)")

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.check()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.check()

    def on_train_end(self, args, state, control, **kwargs):
        self.check()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.check()
        if self.loss_scaled:  # an overflowed step logs inf; check() has judged it already
            return
        for key in ("loss", "grad_norm"):
            v = (logs or {}).get(key)
            if isinstance(v, float) and not math.isfinite(v):
                raise NonFiniteError(state.global_step, key.replace("_", " "))


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_losses(path: str | Path) -> list[float]:
    """The training losses logged in a metrics.jsonl, in step order."""
    return [r["loss"] for r in read_metrics(path) if isinstance(r.get("loss"), (int, float))]


class KeepBest(TrainerCallback):
    """With ``load_best``: write a checkpoint at every evaluation that improves the eval loss.

    transformers can only reload the best evaluation at the end if a checkpoint was saved at that
    step; with ``save_steps`` longer than the run (or than the gap between evaluations) the best
    would be lost and the last step kept in silence. ``on_evaluate`` runs before the Trainer updates
    ``state.best_metric``, so it compares with the best so far; the start (step 0, no adapter yet)
    is never saved.
    """

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_loss")
        if not args.load_best_model_at_end or state.global_step == 0 or not isinstance(value, (int, float)):
            return
        if state.best_metric is None or value < state.best_metric:
            control.should_save = True


class ScheduleOnResume(TrainerCallback):
    """On ``--resume``, give the first resumed step the learning rate of the schedule it now runs.

    The optimizer state restored from a checkpoint carries the learning rate the old schedule set
    for the next step; when the run's length changed (``--max-steps``) the scheduler is rebuilt for
    the new length but only takes effect after one step. Setting each parameter group's rate from
    the rebuilt schedule at the restored step makes the first step follow it too.
    """

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
        lambdas = getattr(sched, "lr_lambdas", None)
        if optimizer is None or lambdas is None or state.global_step == 0:
            return
        for group, base, fn in zip(optimizer.param_groups, sched.base_lrs, lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        set_last_lr(sched, [group["lr"] for group in optimizer.param_groups])  # what the first log line shows
