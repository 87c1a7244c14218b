"""What every objective's Trainer shares: its arguments built from the config, and the precision rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from qfine.config import RunConfig
from qfine.data.readers import BadRow, read_rows
from qfine.util.errors import QfineError


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


def training_arguments(args_cls, cfg: RunConfig, run_dir: Path, device: str, eval_ds, metric: str = "eval_loss",
                       greater_is_better: bool = False, **task_args):
    """``args_cls`` (TrainingArguments or a subclass) from the config: what every objective shares;
    ``task_args``: the objective's own (TRL's SFT settings, say)."""
    t = cfg.train
    precision = resolve_precision(t.precision, device, cfg.model.compute_dtype)
    cuda = device == "cuda"  # resolve_device gives "cuda" or "cpu"
    workers = 2 if cuda and not cfg.data.streaming else 0
    shared = dict(
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
        # Checkpointing is switched on by qfine.methods.lora.add_lora (and the fast path); the Trainer must not redo it.
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
        metric_for_best_model=metric,
        greater_is_better=greater_is_better,
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
    )
    return args_cls(**_version_compat(args_cls, cfg), **{**shared, **task_args})  # the objective's own win


def keeping_adapter_dtypes(model, build):
    """``build()`` (a TRL trainer's constructor) with the trainable parameters as they were before it:
    the same tensors, so the same dtype and the same values.

    TRL casts the adapters of a quantized model to bf16. qfine keeps peft's fp32 adapters: with bf16
    weights (and so bf16 AdamW moments) an update under half a bf16 ulp (~0.2% of the weight) rounds
    away, so low-learning-rate steps late in a schedule stop moving the adapter. Putting the original
    tensors back (not a cast of the bf16 copy) also keeps an adapter loaded before training
    (``--init-adapter``) bit for bit. The arithmetic is bf16 either way (autocast, and the fast path
    casts per GEMM)."""
    before = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
    trainer = build()
    for name, p in model.named_parameters():
        if name in before and p.data is not before[name]:
            p.data = before[name]
    return trainer


def first_usable(source: str, split: str, read, n: int) -> list:
    """``read(row, where)`` of the first ``n`` rows of ``source`` it accepts (bad rows and rows it
    refuses with a QfineError are passed over): the report's sample inputs."""
    out = []
    for where, row in read_rows(source, split):
        if len(out) >= n:
            break
        if isinstance(row, BadRow):
            continue
        try:
            out.append(read(row, where))
        except QfineError:
            continue
    return out
