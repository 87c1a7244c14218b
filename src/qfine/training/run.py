"""The training recipe: check → load → adapt → data → train → save, in one readable function.

Run directory layout::

    RUN_DIR/config.yaml      fully resolved config (re-runnable)
    RUN_DIR/adapter/         PEFT adapter + tokenizer (written atomically at the end)
    RUN_DIR/checkpoints/     trainer checkpoints (for --resume)
    RUN_DIR/metrics.jsonl    one line per log event
    RUN_DIR/tensorboard/     TensorBoard events
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import config as C
from ..adapters import add_lora
from ..data import build_datasets
from ..data.readers import expand
from ..errors import QfineError
from ..fsutil import atomic_dir, atomic_write_text
from ..loading import describe, load_model, resolve_device
from .trainer import build_trainer, check_train_config


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` folder under ``run_dir/checkpoints``, if any."""
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None


def check_run_dir(cfg: C.RunConfig, overwrite: bool, resume: bool) -> tuple[Path, Path | None]:
    """Apply the run-directory rules without touching anything.

    Returns ``(run_dir, checkpoint to resume from or None)``. An existing non-empty directory is
    never reused silently: ``--resume`` continues it from its last checkpoint, ``--overwrite``
    replaces it (only if it is a qfine run), anything else is an error.
    """
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise QfineError(f"output dir {run_dir} exists and is not a directory")
    used = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        ckpt = last_checkpoint(run_dir) if used else None
        if ckpt is None:
            raise QfineError(f"--resume: no checkpoint to resume from in {run_dir / 'checkpoints'}")
        return run_dir, ckpt
    if used:
        if not overwrite:
            what = "a previous qfine run" if (run_dir / "config.yaml").exists() else "other files"
            raise QfineError(f"output dir {run_dir} already holds {what}; pass --overwrite to replace it "
                             "or --resume to continue it")
        if not (run_dir / "config.yaml").exists() and not (run_dir / "adapter").exists():
            raise QfineError(f"output dir {run_dir} is not a qfine run; refusing to delete it even with --overwrite")
    return run_dir, None


def start_run_dir(run_dir: Path, resume: bool) -> None:
    """Empty (unless resuming) and create the run directory checked by :func:`check_run_dir`."""
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def save_adapter(model, tokenizer, out: Path, base_source: str) -> None:
    """Write the PEFT adapter + tokenizer to ``out`` atomically, naming ``base_source`` as its base."""
    for peft_cfg in model.peft_config.values():
        peft_cfg.base_model_name_or_path = base_source
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def train(cfg: C.RunConfig, overwrite: bool = False, resume: bool = False, callbacks=()) -> Path:
    """Fine-tune per ``cfg``; returns the run directory (adapter in ``RUN_DIR/adapter``)."""
    if not cfg.data.path:
        raise QfineError("no training data: pass --data FILE or set data.path in the config")
    device = resolve_device(cfg.model.device)
    check_train_config(cfg, device)
    if cfg.data.streaming and cfg.train.max_steps <= 0:
        raise QfineError("data.streaming needs train.max_steps (a stream has no known length for epochs)")
    expand(cfg.data.path)  # a missing file or empty glob fails before anything is loaded
    run_dir, ckpt = check_run_dir(cfg, overwrite, resume)

    # Everything that can fail on user input (model, data, targets) runs before the run dir is touched.
    loaded = load_model(cfg.model)
    tokenizer = loaded.tokenizer
    train_ds, eval_ds, stats = build_datasets(tokenizer, cfg.data, cfg.train.seed)
    if cfg.data.streaming:
        print(f"[qfine] data: streaming {cfg.data.path}", flush=True)
    else:
        held = f", {len(eval_ds)} held out for eval" if eval_ds is not None and not cfg.data.eval_path else ""
        print(f"[qfine] data: {stats.rows} rows ({stats.tokens} tokens){held}; {stats.truncated} truncated to "
              f"{cfg.data.max_seq_len}, {stats.dropped} dropped, {stats.skipped} bad rows skipped", flush=True)

    model = add_lora(loaded.model, cfg.lora, cfg.train.gradient_checkpointing)
    print(f"[qfine] {cfg.model.source} ({cfg.model.quantization}) on {device}: {describe(model)}", flush=True)
    start_run_dir(run_dir, resume)
    atomic_write_text(run_dir / "config.yaml", C.to_yaml(cfg))

    trainer = build_trainer(model, tokenizer, train_ds, eval_ds, cfg, run_dir, device, callbacks)
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    save_adapter(model, tokenizer, run_dir / "adapter", loaded.source)
    print(f"[qfine] adapter saved to {run_dir / 'adapter'}", flush=True)
    return run_dir
