"""Multi-task adapters: one ``shared`` LoRA adapter plus one per task, in one peft model.

While a task runs, ``shared`` and that task's adapter are active (peft adds their updates,
``y = W x + s_s B_s A_s x + s_t B_t A_t x``). A run's ``adapter/`` folder holds ``shared/`` and one
folder per task, each a PEFT adapter that loads on its own. Training over single-task batches is
:mod:`qfine.objectives.multitask`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qfine.methods.lora import add_adapter, load_adapter, set_active
from qfine.util.errors import QfineError

SHARED = "shared"


def add_task_adapters(model, lora, names: list[str], task_r: int, seed: int) -> list[str]:
    """Add one adapter per task (rank ``task_r``, else ``lora.r``; alpha scaled to keep alpha / r) next
    to the ``shared`` one; returns lines describing the parameter counts."""
    r = task_r or lora.r
    task_cfg = dataclasses.replace(lora, r=r, alpha=lora.alpha * r / lora.r, trainable=[], modules_to_save=[])
    for i, name in enumerate(names):
        add_adapter(model, name, task_cfg, seed=seed + 1 + i)
    for key, p in model.named_parameters():  # all in the optimizer; each batch then unfreezes its own
        if "lora_" in key:
            p.requires_grad_(True)
    counts = adapter_params(model)
    parts = ", ".join(f"{n} {counts[n]:,}" for n in [SHARED, *names])
    return [f"multi-task: adapter {SHARED} (r={lora.r}) + one per task (r={r}): {parts} parameters"]


def adapter_params(model) -> dict[str, int]:
    """Trainable parameters of each adapter, by adapter name (peft's ``.{name}.`` key component)."""
    names = list(model.peft_config)
    counts = dict.fromkeys(names, 0)
    for key, p in model.named_parameters():
        for n in names:
            if f".{n}." in key or key.endswith(f".{n}"):
                counts[n] += p.numel()
    return counts


def activate(model, names: list[str], task: str) -> None:
    """Make ``shared`` and ``task`` the active adapters. peft's ``set_adapter`` also freezes every
    other adapter's LoRA weights and unfreezes these, so in training only the pair gets gradients."""
    if task not in names:
        raise QfineError(f"no task {task!r} in this run; its tasks: {', '.join(names)}")
    set_active(model, [SHARED, task])


def run_tasks(adapter_dir: Path) -> list[str]:
    """The task adapters saved in a multi-task run's ``adapter/`` folder ([] for a plain run)."""
    if not (adapter_dir / SHARED / "adapter_config.json").is_file():
        return []
    return sorted(p.name for p in adapter_dir.iterdir()
                  if p.name != SHARED and (p / "adapter_config.json").is_file())


def check_task(adapter_dir: Path, task: str | None) -> None:
    """Refuse a missing or unknown ``task`` for a multi-task run's adapter folder, naming its tasks."""
    tasks = run_tasks(adapter_dir)
    if task is None:
        raise QfineError(f"this run trained one adapter per task: pass --task-adapter with one of {', '.join(tasks)}")
    if task not in tasks:
        raise QfineError(f"no task {task!r} in this run; its tasks: {', '.join(tasks)}")


def load_task(model, adapter_dir: Path, task: str | None):
    """Attach ``shared`` and ``task`` from a multi-task run's adapter folder to a fresh base; active
    together. ``task`` None, or not one of the run's, is refused naming the tasks."""
    check_task(adapter_dir, task)
    peft_model = load_adapter(model, adapter_dir / SHARED, adapter_name=SHARED)
    peft_model.load_adapter(str(adapter_dir / task), adapter_name=task)
    activate(peft_model, [task], task)
    return peft_model
