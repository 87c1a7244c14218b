"""The run directory's rules: never reused silently, resumed from its newest whole checkpoint, replaced
only with --overwrite and only when it is a qfine run; the adapter written atomically.

Layout::

    RUN_DIR/config.yaml      fully resolved config (re-runnable)
    RUN_DIR/adapter/         PEFT adapter + tokenizer (written atomically at the end)
    RUN_DIR/checkpoints/     trainer checkpoints (for --resume), each sealed once whole
    RUN_DIR/metrics.jsonl    one line per log event
    RUN_DIR/tensorboard/     TensorBoard events
    RUN_DIR/data.json        rows, tokens and a hash of the tokenized training data
    RUN_DIR/report.html      curves, config, samples before/after
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qfine import config as C
from qfine.methods.lora import REFERENCE
from qfine.training.resume import check_resume_config, checkpoints, resume_point, step_of
from qfine.util.errors import QfineError
from qfine.util.files import atomic_dir, writing
from qfine.util.integrity import check_checkpoint


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole ``checkpoint-N`` folder under ``run_dir/checkpoints``, if any."""
    return resume_point(run_dir)[0]


def drop_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Remove the checkpoints newer than the newest whole one (a save that failed half-way, e.g. on a
    full disk, leaves one without its seal); returns them."""
    good = last_checkpoint(run_dir)
    partial = [p for p in checkpoints(run_dir) if good is None or step_of(p) > step_of(good)]
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    return partial


def check_run_dir(cfg: C.RunConfig, overwrite: bool, resume: bool) -> tuple[Path, Path | None, list[str]]:
    """Apply the run-directory rules without touching anything.

    Returns ``(run_dir, checkpoint to resume from or None, lines to print)``. An existing non-empty
    directory is never reused silently: ``--resume`` continues it from its newest whole checkpoint
    (newer half-written ones are skipped and named) if the config still describes the same run,
    ``--overwrite`` replaces it (only if it is a qfine run), anything else is an error.
    """
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise QfineError(f"output dir {run_dir} exists and is not a directory")
    used = run_dir.is_dir() and any(run_dir.iterdir())
    if resume and overwrite:
        raise QfineError("--resume and --overwrite contradict each other; pass one")
    if resume:
        ckpt, notes = resume_point(run_dir) if used else (None, [])
        if ckpt is None:
            why = f" ({'; '.join(notes)})" if notes else ""
            raise QfineError(f"--resume: no whole checkpoint to resume from in {run_dir / 'checkpoints'}{why}")
        check_checkpoint(ckpt)
        changed = check_resume_config(run_dir, cfg)
        notes.append(f"resuming from {ckpt} (step {step_of(ckpt)})" +
                     (f"; changed: {'; '.join(changed)}" if changed else ""))
        return run_dir, ckpt, notes
    if used:
        if not overwrite:
            what = "a previous qfine run" if (run_dir / "config.yaml").exists() else "other files"
            raise QfineError(f"output dir {run_dir} already holds {what}; pass --overwrite to replace it "
                             "or --resume to continue it")
        if not (run_dir / "config.yaml").exists() and not (run_dir / "adapter").exists():
            raise QfineError(f"output dir {run_dir} is not a qfine run; refusing to delete it even with --overwrite")
    return run_dir, None, []


def start_run_dir(run_dir: Path, resume: bool) -> None:
    """Empty (unless resuming) and create the run directory checked by :func:`check_run_dir`."""
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def save_adapter(model, tokenizer, out: Path, base_source: str) -> None:
    """Write the PEFT adapter + tokenizer to ``out`` atomically, naming ``base_source`` as its base."""
    for peft_cfg in model.peft_config.values():
        peft_cfg.base_model_name_or_path = base_source
    # a preference run's frozen reference adapter (qfine.methods.lora.REFERENCE) is an input, not a result
    kept = [name for name in model.peft_config if name != REFERENCE]
    needed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with writing(out, "saving the adapter", needed=needed,
                 kept="every checkpoint is intact: free space, then run the same command with --resume to save it"), \
            atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp, selected_adapters=kept)
        tokenizer.save_pretrained(tmp)
