"""Build TRL's SFTTrainer from a :class:`RunConfig`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import QfineError
from .callbacks import KeepBest, MetricsJsonl, NonFiniteGuard, ScheduleOnResume
from .progress import ConsoleProgress
from .resume import CheckpointSeal

_CUDA_OPTIMIZERS = {"paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_bnb_8bit"}
_OPTIMIZERS = {"adamw_torch", "adamw_torch_fused", "sgd", "adafactor"} | _CUDA_OPTIMIZERS
_SCHEDULERS = {"cosine", "linear", "constant", "constant_with_warmup"}


def resolve_precision(name: str, device: str, compute_dtype: str = "auto") -> str:
    """``auto`` → on CUDA the model's compute dtype when one is set (fp32 weights train in fp32, not
    under bf16 autocast), else bf16 on GPUs that support it and fp16 on others; fp32 on CPU."""
    if name == "auto":
        if device == "cuda":
            if compute_dtype in ("bf16", "fp16", "fp32"):
                return compute_dtype
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name not in ("bf16", "fp16", "fp32"):
        raise QfineError(f"train.precision must be auto, bf16, fp16 or fp32, not {name!r}")
    if name == "fp16" and device == "cpu":
        raise QfineError("train.precision fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    return name


def check_train_config(cfg: RunConfig, device: str) -> None:
    """Reject settings that cannot work on ``device`` before any model is loaded."""
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
    if t.stream_weights not in ("auto", "on", "off"):
        raise QfineError(f"train.stream_weights must be auto, on or off, not {t.stream_weights!r}")
    if t.stream_weights == "on" and t.resident_weights_gib > 0:
        raise QfineError("train.stream_weights on keeps the frozen weights in host memory; "
                         "train.resident_weights_gib keeps them dequantized on the GPU: choose one")
    if t.batch_size < 1 or t.grad_accum < 1:
        raise QfineError("train.batch_size and train.grad_accum must be at least 1")
    if t.s2_attn:
        group = t.s2_group or cfg.data.max_seq_len // 4
        if cfg.model.task != "causal-lm":
            raise QfineError(f"train.s2_attn serves causal LMs, not model.task {cfg.model.task}")
        if cfg.data.packing:
            raise QfineError("train.s2_attn with data.packing: a group would mix packed examples; turn one off")
        if group < 2 or group % 2:
            raise QfineError(f"train.s2_group must be an even number of tokens of at least 2, not {group}")
    resolve_precision(t.precision, device, cfg.model.compute_dtype)


def _version_compat(config_cls, cfg: RunConfig) -> dict:
    """Arguments whose names changed across transformers 5.x (warmup ratio, length grouping)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    kw: dict = {}
    if "warmup_ratio" in names:
        kw["warmup_ratio"] = cfg.train.warmup_ratio
    else:  # newer releases take a float in [0, 1) in warmup_steps as a ratio of the total steps
        kw["warmup_steps"] = cfg.train.warmup_ratio
    if cfg.data.group_by_length:
        if "train_sampling_strategy" in names:
            kw["train_sampling_strategy"] = "group_by_length"
        else:
            kw["group_by_length"] = True
    return kw


def _arguments(args_cls, cfg: RunConfig, run_dir: Path, device: str, eval_ds, **task_args):
    """``args_cls`` (TrainingArguments or a subclass) from the config: what every task shares."""
    t = cfg.train
    precision = resolve_precision(t.precision, device, cfg.model.compute_dtype)
    cuda = device == "cuda"  # resolve_device gives "cuda" or "cpu"
    workers = 2 if cuda and not cfg.data.streaming else 0
    return args_cls(**_version_compat(args_cls, cfg), **dict(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        # Checkpointing is switched on by qfine.adapters.add_lora (non-reentrant); the Trainer must not redo it.
        gradient_checkpointing=False,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no" if eval_ds is None else "steps",
        eval_steps=(t.eval_steps or t.save_steps) if eval_ds is not None else None,
        eval_on_start=eval_ds is not None,
        # the best checkpoint by eval loss is kept and becomes the final adapter
        load_best_model_at_end=eval_ds is not None and t.load_best,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=list(t.report_to) or "none",
        include_num_input_tokens_seen="non_padding",
        # Trainer's filter tests every micro-batch's loss on the host (a GPU sync per micro-batch) to
        # log an average instead of a NaN; NonFiniteGuard stops the run at the first one anyway
        logging_nan_inf_filter=False,
        # On CUDA the host must never make the GPU wait for data. Each batch's host→device copy is
        # asynchronous (Trainer's blocking copy waited for the GPU's whole queue, then the GPU idled
        # while the host prepared the step), and batches are collated by worker processes and pinned
        # in a thread ahead of time (docs/benchmarks.md: the GPU sat idle ~6 ms a step collating
        # 4×2048 tokens). A stream keeps one reader (workers would each need their own shard of it).
        accelerator_config={"non_blocking": cuda},
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        disable_tqdm=False,
        **task_args,
    ))


def _callbacks(cfg: RunConfig, run_dir: Path, eval_ds, resume_step: int | None, args, callbacks) -> list:
    """qfine's callbacks, in the order they must run: the guard raises before anything logs a bad
    step; MetricsJsonl adds tokens/s and perplexity to the log dict before TensorBoard writes it.
    ``resume_step``: the step a resumed run continues from (TensorBoard drops later events)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    purge = resume_step + 1 if resume_step is not None else None
    tb = TensorBoardCallback(tb_writer=SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge))
    extra = []
    if eval_ds is not None and cfg.train.early_stopping_patience > 0:
        from transformers import EarlyStoppingCallback

        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    return [NonFiniteGuard(loss_scaled=bool(args.fp16)),
            MetricsJsonl(run_dir / "metrics.jsonl", perplexity=cfg.model.task != "seq-cls"), tb,
            CheckpointSeal(), KeepBest(), ScheduleOnResume(), ConsoleProgress(), *extra, *callbacks]


def _own_console(trainer):
    """Take transformers' console callbacks out: :class:`ConsoleProgress` prints instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


def build_trainer(model, tokenizer, train_ds, eval_ds, cfg: RunConfig, run_dir: Path, device: str,
                  callbacks=(), resume_step: int | None = None):
    """The trainer of ``cfg.model.task`` over pre-tokenized ``input_ids``/``labels`` datasets, logging
    into ``run_dir``: TRL's SFTTrainer for causal-lm (CUDA graphs for its training step are switched
    on separately: ``enable_cuda_graphs``), transformers' Trainer for seq-cls and Seq2SeqTrainer for
    seq2seq. ``resume_step``: the step of the checkpoint a resumed run continues from."""
    if cfg.model.task != "causal-lm":
        return _task_trainer(model, tokenizer, train_ds, eval_ds, cfg, run_dir, device, callbacks, resume_step)
    from trl import SFTConfig

    from .graphed import QfineSFTTrainer

    args = _arguments(SFTConfig, cfg, run_dir, device, eval_ds,
                      max_length=cfg.data.max_seq_len,
                      # Packing puts several examples in one row with restarting position_ids (TRL's
                      # best-fit decreasing); attention is then confined to each example (padding-free batches).
                      packing=cfg.data.packing,
                      packing_strategy="bfd",
                      shuffle_dataset=not cfg.data.streaming,
                      dataset_num_proc=None,
                      remove_unused_columns=True)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    trainer_cls = QfineSFTTrainer
    if cfg.data.task_column:
        from .multitask import trainer_class

        trainer_cls = trainer_class(QfineSFTTrainer)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tokenizer,
                              callbacks=_callbacks(cfg, run_dir, eval_ds, resume_step, args, callbacks))
    # TRL casts the adapters of a quantized model to bf16. qfine keeps peft's fp32 adapters: with bf16
    # weights (and so bf16 AdamW moments) an update under half a bf16 ulp (~0.2% of the weight) rounds
    # away, so low-learning-rate steps late in a schedule stop moving the adapter. The arithmetic is
    # bf16 either way (autocast, and the fast path casts per GEMM).
    for name, p in model.named_parameters():
        if name in dtypes and p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
    return _own_console(trainer)


def _task_trainer(model, tokenizer, train_ds, eval_ds, cfg: RunConfig, run_dir: Path, device: str, callbacks,
                  resume_step):
    """transformers' Trainer (seq-cls: padded batches, accuracy and macro-F1 at each evaluation) or
    Seq2SeqTrainer (seq2seq: targets padded with -100) — same arguments and callbacks as causal-lm."""
    import transformers

    if cfg.model.task == "seq-cls":
        from ..tasks.classify import trainer_metrics

        args = _arguments(transformers.TrainingArguments, cfg, run_dir, device, eval_ds)
        collator = transformers.DataCollatorWithPadding(tokenizer)
        trainer_cls, extra = transformers.Trainer, {"compute_metrics": trainer_metrics}
    else:
        args = _arguments(transformers.Seq2SeqTrainingArguments, cfg, run_dir, device, eval_ds)
        collator = transformers.DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
        trainer_cls, extra = transformers.Seq2SeqTrainer, {}
    return _own_console(trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                    processing_class=tokenizer, data_collator=collator,
                                    callbacks=_callbacks(cfg, run_dir, eval_ds, resume_step, args, callbacks),
                                    **extra))
