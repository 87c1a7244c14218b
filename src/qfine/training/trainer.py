"""The run's Trainer: its objective's (:mod:`qfine.objectives`) with qfine's callbacks, and the checks of
the training settings that need no model."""

from __future__ import annotations

import functools
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from transformers import EarlyStoppingCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from qfine import config as C
from qfine.config import RunConfig
from qfine.objectives.base import Objective
from qfine.objectives.common import resolve_precision, training_arguments
from qfine.training.callbacks import KeepBest, MetricsJsonl, NonFiniteGuard, ScheduleOnResume
from qfine.training.progress import ConsoleProgress
from qfine.training.resume import CheckpointSeal
from qfine.util.errors import QfineError

_CUDA_OPTIMIZERS = {"paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_bnb_8bit"}
_OPTIMIZERS = {"adamw_torch", "adamw_torch_fused", "sgd", "adafactor"} | _CUDA_OPTIMIZERS
_SCHEDULERS = set(C.allowed(C.TrainConfig, "lr_scheduler"))


def check_train_config(cfg: RunConfig, device: str, objective: Objective) -> None:
    """Reject settings that cannot work on ``device`` or for ``objective`` before any model is loaded."""
    t = cfg.train
    if t.optimizer not in _OPTIMIZERS:
        raise QfineError(f"train.optimizer {t.optimizer!r} is not supported; choose one of {', '.join(sorted(_OPTIMIZERS))}")
    if t.optimizer in _CUDA_OPTIMIZERS and device != "cuda":
        raise QfineError(f"train.optimizer {t.optimizer} needs a CUDA GPU (bitsandbytes paged/8-bit optimizers); "
                         "use adamw_torch on CPU")
    if t.lr_scheduler not in _SCHEDULERS:
        raise QfineError(f"train.lr_scheduler must be one of {', '.join(sorted(_SCHEDULERS))}, not {t.lr_scheduler!r}")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
        raise QfineError("nothing to train: set train.max_steps > 0 or train.epochs > 0")
    eval_every = t.eval_steps or t.save_steps
    if (cfg.data.eval_path or cfg.data.eval_ratio) and t.load_best and t.save_steps % eval_every:
        raise QfineError(f"train.save_steps ({t.save_steps}) must be a multiple of train.eval_steps ({eval_every}) "
                         "to keep the best checkpoint; or set train.load_best false")
    if not 0 <= t.warmup_ratio < 1:
        raise QfineError(f"train.warmup_ratio must be in [0, 1), not {t.warmup_ratio}")
    if t.resident_weights_gib < 0:
        raise QfineError(f"train.resident_weights_gib must be 0 or more, not {t.resident_weights_gib}")
    if t.stream_weights not in C.allowed(C.TrainConfig, "stream_weights"):
        raise QfineError(f"train.stream_weights must be auto, on or off, not {t.stream_weights!r}")
    if t.stream_weights == "on" and t.resident_weights_gib > 0:
        raise QfineError("train.stream_weights on keeps the frozen weights in host memory; "
                         "train.resident_weights_gib keeps them dequantized on the GPU: choose one")
    if t.batch_size < 1 or t.grad_accum < 1:
        raise QfineError("train.batch_size and train.grad_accum must be at least 1")
    if t.s2_attn:
        group = t.s2_group or cfg.data.max_seq_len // 4
        if not objective.supports.s2_attn:
            raise QfineError(f"train.s2_attn serves causal LMs, not model.task {cfg.model.task}")
        if cfg.data.packing:
            raise QfineError("train.s2_attn with data.packing: a group would mix packed examples; turn one off")
        if group < 2 or group % 2:
            raise QfineError(f"train.s2_group must be an even number of tokens of at least 2, not {group}")
    resolve_precision(t.precision, device, cfg.model.compute_dtype)


def callbacks_for(cfg: RunConfig, objective: Objective, run_dir: Path, device: str, has_eval: bool,
                  resume_step: int | None, extra=()) -> list:
    """qfine's callbacks, in the order they must run: the guard raises before anything logs a bad
    step; MetricsJsonl adds tokens/s and perplexity to the log dict before TensorBoard writes it, and
    ConsoleProgress prints after both. ``resume_step``: the step a resumed run continues from
    (TensorBoard drops later events); ``extra``: the caller's own callbacks, last."""
    purge = resume_step + 1 if resume_step is not None else None
    tb = TensorBoardCallback(tb_writer=SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge))
    stop = ([EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience)]
            if has_eval and cfg.train.early_stopping_patience > 0 else [])
    fp16 = resolve_precision(cfg.train.precision, device, cfg.model.compute_dtype) == "fp16"
    return [NonFiniteGuard(loss_scaled=fp16),
            MetricsJsonl(run_dir / "metrics.jsonl", perplexity=objective.supports.perplexity), tb,
            CheckpointSeal(), KeepBest(), ScheduleOnResume(), ConsoleProgress(), *stop, *extra]


def build_trainer(objective: Objective, model, tokenizer, train_ds, eval_ds, cfg: RunConfig, run_dir: Path,
                  device: str, callbacks=(), resume_step: int | None = None):
    """``objective``'s Trainer over its tokenized datasets, logging into ``run_dir`` with qfine's
    callbacks (:func:`callbacks_for`) and printing through :class:`ConsoleProgress` instead of
    transformers' own console callbacks. ``resume_step``: the step of the checkpoint a resumed run
    continues from."""
    arguments = functools.partial(training_arguments, cfg=cfg, run_dir=run_dir, device=device, eval_ds=eval_ds,
                                  metric=objective.metric, greater_is_better=objective.greater_is_better)
    hooks = callbacks_for(cfg, objective, run_dir, device, eval_ds is not None, resume_step, callbacks)
    trainer = objective.trainer(model, tokenizer, train_ds, eval_ds, cfg, arguments, hooks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer

