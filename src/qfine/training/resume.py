"""Resuming a run: which checkpoint is whole, whether the config still describes the same run, and
which logged rows the resumed run replaces.

transformers writes a checkpoint folder in place (adapter, optimizer, scheduler, RNG state, trainer
state, in that order), so a run killed while saving leaves a newest ``checkpoint-N`` that looks like
any other. :class:`CheckpointSeal` records every file of a checkpoint with its size once the
Trainer has finished it (``on_save``), and :func:`resume_point` takes the newest checkpoint whose
record matches what is on disk, naming each newer one it skips and why.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from qfine import config as C
from qfine.util import distributed
from qfine.util.errors import QfineError
from qfine.util.files import atomic_write_text, plain_modes

SEAL = "qfine-checkpoint.json"
DATA_RECORD = "data.json"

# Fields that may change on --resume: how long the run goes, how it is logged, saved and watched, and
# how a step is computed (not what it computes). Anything else — model, adapter shape, data, the
# optimizer and its schedule, batch, precision, seed — would make the resumed steps belong to
# another run than the checkpoint's, so a change there is refused.
RESUMABLE = {
    ("train", "max_steps"): "the learning-rate schedule is recomputed for the new length",
    ("train", "epochs"): "the learning-rate schedule is recomputed for the new length",
    ("train", "save_steps"): "",
    ("train", "save_total_limit"): "",
    ("train", "logging_steps"): "",
    ("train", "eval_steps"): "",
    ("train", "early_stopping_patience"): "",
    ("train", "report_to"): "",
    ("train", "report_samples"): "",
    ("train", "fast_path"): "same arithmetic, other kernels (GPU rounding may differ)",
    ("train", "cuda_graphs"): "same arithmetic, other kernels (GPU rounding may differ)",
    ("train", "resident_weights_gib"): "",
    ("train", "gradient_checkpointing"): "",
    ("train", "offload_checkpoints"): "",
    ("train", "stream_weights"): "",
    ("train", "auto_memory"): "",
}


def step_of(folder: Path) -> int:
    """N of a ``checkpoint-N`` folder (-1 when the name has no number)."""
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders under ``run_dir/checkpoints``, oldest first."""
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.is_dir() and step_of(p) >= 0]
    return sorted(found, key=step_of)


def seal(folder: Path, step: int) -> None:
    """Record the files of a finished checkpoint and their sizes in bytes (written atomically); the
    files get ordinary modes first (the Trainer's safetensors are written 0600)."""
    plain_modes(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SEAL and not p.name.startswith(".")}
    atomic_write_text(folder / SEAL, json.dumps({"step": step, "files": files}, indent=1))


def why_incomplete(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when every recorded file is there, whole."""
    record = folder / SEAL
    if not record.is_file():
        return "it has no completion record (it was still being written when the run stopped)"
    try:
        files = json.loads(record.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return f"its completion record {SEAL} is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written"
    return None


def resume_point(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest whole checkpoint of ``run_dir`` (or None) and a line for each newer one skipped."""
    skipped = []
    for folder in reversed(checkpoints(run_dir)):
        why = why_incomplete(folder)
        if why is None:
            return folder, skipped
        skipped.append(f"skipping {folder}: {why}")
    return None, skipped


def finished_adapter(ckpt: Path, load_best: bool) -> Path:
    """The checkpoint whose adapter a run that already reached its last step ends with: the best one
    by eval loss when the run keeps the best (and it is still there), else ``ckpt``."""
    state = ckpt / "trainer_state.json"
    if load_best and state.is_file():
        best = json.loads(state.read_text(encoding="utf-8")).get("best_model_checkpoint")
        if best and Path(best).is_dir() and why_incomplete(Path(best)) is None:
            return Path(best)
    return ckpt


def load_checkpoint_adapter(model, ckpt: Path) -> None:
    """Put the adapter weights saved in checkpoint ``ckpt`` into ``model`` (a PeftModel)."""

    weights = load_file(str(ckpt / "adapter_model.safetensors"), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise QfineError(f"{ckpt}: adapter weights {', '.join(missing[:3])} do not fit this model")


class CheckpointSeal(TrainerCallback):
    """Seal each checkpoint once the Trainer has written all of it (see :func:`seal`)."""

    def on_save(self, args, state, control, **kwargs):

        distributed.barrier()  # every rank has written its part (each its own RNG state file)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            seal(folder, state.global_step)
        distributed.barrier()


def _flat(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in C.SECTIONS:
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def config_changes(old: C.RunConfig, new: C.RunConfig) -> list[tuple[tuple, Any, Any]]:
    """``(key, old value, new value)`` for every field that differs (output_dir not compared)."""
    a, b = _flat(C.to_dict(old)), _flat(C.to_dict(new))
    return [(k, a.get(k), b.get(k)) for k in b if k != ("output_dir",) and a.get(k) != b.get(k)]


def _name(key: tuple) -> str:
    return ".".join(key)


def check_resume_config(run_dir: Path, cfg: C.RunConfig) -> list[str]:
    """Compare ``cfg`` with the run's ``config.yaml``: raise QfineError naming every change that
    would make the resumed steps another run's; return a line for each change that is applied."""
    path = run_dir / "config.yaml"
    old = C.load_yaml(path)
    changes = config_changes(old, cfg)
    refused = [c for c in changes if c[0] not in RESUMABLE]
    if refused:
        listed = ", ".join(f"{_name(k)} {a!r} → {b!r}" for k, a, b in refused)
        raise QfineError(f"--resume: the config differs from the run's {path} in {listed}; the checkpoint was "
                         "trained with the first values, so the resumed steps would belong to another run. Resume "
                         f"with the run's own settings (qfine train {path} --resume) or start a new --output-dir")
    return [f"{_name(k)} {a!r} → {b!r}" + (f" ({RESUMABLE[k]})" if RESUMABLE[k] else "") for k, a, b in changes]


def _token_column(rows: list) -> bool:
    """Whether a column holds ids or labels: ints, or lists of ints."""
    first = next((r for r in rows if r is not None), None)
    if isinstance(first, list):
        return all(isinstance(x, int) for x in first[:8])
    return isinstance(first, int)


def data_record(train_ds) -> dict | None:
    """Rows, tokens and a SHA-256 of the tokenized training data (ids and labels), or None for a stream."""
    if not hasattr(train_ds, "__len__"):
        return None
    h = hashlib.sha256()
    tokens = 0
    names = train_ds.column_names
    # sft/classify/seq2seq rows: ids and labels; preference rows: every column (chosen_ids, …), sorted
    columns = ("input_ids", "labels") if "input_ids" in names else sorted(names)
    for batch in train_ds.iter(batch_size=4096):
        for name in columns:
            rows = batch[name]
            if rows and not _token_column(rows):  # text or messages (a GRPO row's prompt, answer): as JSON
                h.update(json.dumps(rows, sort_keys=True, default=str).encode())
                continue
            if rows and not isinstance(rows[0], list):  # one label per row (seq-cls)
                h.update(np.asarray(rows, dtype=np.int64).tobytes())
                continue
            lengths = np.fromiter(map(len, rows), dtype=np.int64)
            h.update(lengths.tobytes())
            h.update(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64).tobytes())
            if name.endswith("ids"):
                tokens += int(lengths.sum())
    return {"rows": len(train_ds), "tokens": tokens, "sha256": h.hexdigest()}


def check_resume_data(run_dir: Path, record: dict | None, source: str) -> None:
    """Refuse to resume when the tokenized training data differ from what the run started with."""
    path = run_dir / DATA_RECORD
    if record is None or not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    if old.get("sha256") != record["sha256"]:
        raise QfineError(f"--resume: the training data {source} are not what this run was trained on "
                         f"({old.get('rows')} rows, {old.get('tokens')} tokens then; {record['rows']} rows, "
                         f"{record['tokens']} tokens now, or the same counts with other content); restore them or "
                         "start a new --output-dir")


def write_data_record(run_dir: Path, record: dict | None) -> None:
    if record is not None:
        atomic_write_text(run_dir / DATA_RECORD, json.dumps(record, indent=1) + "\n")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` logged at or before ``step`` (the resumed checkpoint's);
    the resumed run logs the later steps again. Returns the number of rows dropped."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut short by the kill
            continue
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
