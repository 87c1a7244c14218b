"""Multi-task QLoRA: one shared adapter plus one adapter per task, trained together.

Every training row names its task
(``data.task_column``). Each micro-batch holds rows of one task only, and while it runs, the adapters
``shared`` and that task's are active (peft adds their updates, ``y = W x + s_s B_s A_s x +
s_t B_t A_t x``). The other tasks' adapters are frozen for that micro-batch, so they receive no
gradient. AdamW then skips them: a parameter without a gradient is not updated at all, weight
decay included.

* :class:`TaskSampler` orders the rows in whole single-task batches of ``batch_size`` rows. A task's
  last partial batch is filled with its own rows again, so batch boundaries never mix tasks.
  ``data.task_weights`` sets how many batches each task gets per epoch: by default as many as its
  rows fill; with weights, the epoch's batch count is shared out in proportion to them.
* :class:`TaskCollator` carries the batch's task id through TRL's collator, as a ``task_id``
  tensor.
* :class:`MultiTaskTrainer` activates the task's adapters before each micro-batch.

The adapters themselves (adding, activating, saving, loading) are :mod:`qfine.methods.multitask`.
``qfine generate/chat/eval/merge RUN --task-adapter NAME`` activates shared + NAME.
"""

from __future__ import annotations

import math

import torch

from qfine.methods.multitask import SHARED, activate
from qfine.util import distributed
from qfine.util.errors import QfineError


def task_names(values) -> list[str]:
    """The distinct task names of a dataset's task column, sorted (their index is the task id)."""
    names = sorted(set(values))
    if len(names) < 2:
        raise QfineError(f"data.task_column: multi-task training needs at least two tasks, found {names}")
    if SHARED in names:
        raise QfineError(f"data.task_column: {SHARED!r} is the shared adapter's name; rename that task")
    return names


def batch_counts(rows: dict[str, int], batch_size: int, weights: dict[str, float]) -> dict[str, int]:
    """Batches per task in one epoch: ceil(rows / batch_size) each, or, with ``weights``, the same
    total shared out in proportion to the weights (every task at least one batch)."""
    plain = {t: math.ceil(n / batch_size) for t, n in rows.items()}
    if not weights:
        return plain
    unknown = sorted(set(weights) - set(rows))
    if unknown:
        raise QfineError(f"data.task_weights: no rows of task(s) {', '.join(unknown)}; tasks: {', '.join(rows)}")
    w = {t: float(weights.get(t, 1.0)) for t in rows}
    if any(v < 0 for v in w.values()) or not any(w.values()):
        raise QfineError("data.task_weights must be non-negative numbers, not all zero")
    total = sum(plain.values())
    return {t: max(1, round(total * v / sum(w.values()))) if v else 0 for t, v in w.items()}


class TaskSampler(torch.utils.data.Sampler):
    """Row indices in whole single-task batches: ``batch_size`` consecutive indices share a task.

    ``task_ids``: each row's task id. The order depends on ``seed`` and the epoch
    (:meth:`set_epoch`, which Trainer calls), so a resumed run replays the same batches."""

    def __init__(self, task_ids: list[int], names: list[str], batch_size: int, weights: dict[str, float],
                 seed: int):
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.rows = {t: [i for i, k in enumerate(task_ids) if k == t] for t in range(len(names))}
        counts = batch_counts({names[t]: len(r) for t, r in self.rows.items()}, batch_size, weights)
        self.counts = {t: counts[names[t]] for t in self.rows}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.counts.values()) * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        batches = []
        for t, rows in self.rows.items():
            need = self.counts[t] * self.batch_size
            order: list[int] = []
            while len(order) < need:  # whole passes over the task's rows, each reshuffled
                order += [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
            batches += [order[i:i + self.batch_size] for i in range(0, need, self.batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield from batches[b]


class TaskCollator:
    """Wraps a collator: takes ``task_id`` off each row, checks the batch holds one task, and adds
    it to the batch as a (1,) tensor."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, rows: list[dict]) -> dict:
        ids = {r.get("task_id") for r in rows}
        if len(ids) != 1 or None in ids:
            raise RuntimeError(f"a multi-task batch must hold one task, got task ids {sorted(map(str, ids))}")
        batch = self.inner([{k: v for k, v in r.items() if k != "task_id"} for r in rows])
        batch["task_id"] = torch.tensor([ids.pop()])
        return batch


def trainer_class(base):
    """``base`` (qfine's SFTTrainer subclass) with single-task batches and per-batch adapters."""

    class MultiTaskTrainer(base):
        task_names: list[str] = []
        task_weights: dict = {}
        _active_task: int | None = None

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "task_id" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "task_id"]

        def _get_train_sampler(self, *args, **kwargs):
            ds = self.train_dataset
            return TaskSampler(list(ds["task_id"]), self.task_names, self.args.per_device_train_batch_size,
                               self.task_weights, self.args.seed)

        def get_train_dataloader(self):
            if not isinstance(self.data_collator, TaskCollator):
                self.data_collator = TaskCollator(self.data_collator)
            return super().get_train_dataloader()

        def training_step(self, model, inputs, num_items_in_batch=None):
            task = int(inputs.pop("task_id")[0])
            if task != self._active_task:
                activate(self.model, self.task_names, self.task_names[task])
                self._active_task = task
            return super().training_step(model, inputs, num_items_in_batch)

    return MultiTaskTrainer


def check_config(cfg, resume: bool) -> None:
    """Refuse what a multi-task run does not support, before anything is loaded."""
    if cfg.model.task != "causal-lm":
        raise QfineError(f"data.task_column: multi-task adapters serve causal-lm runs, not model.task {cfg.model.task}")
    why = {"data.packing": cfg.data.packing and "a packed row would mix tasks",
           "data.streaming": cfg.data.streaming and "the task batches are drawn from the whole dataset",
           "data.eval_path / data.eval_ratio": bool(cfg.data.eval_path or cfg.data.eval_ratio)
           and "evaluate each task after training: qfine eval RUN --task-adapter NAME --data ROWS",
           "lora.method qa-lora": cfg.lora.method == "qa-lora" and "one INT4 fold per task is not built",
           "--resume": resume and "resuming several adapters from a checkpoint is not supported yet",
           "a launched job (several ranks)": distributed.world_size() > 1
           and "the task batches are not sharded across ranks yet"}
    for what, reason in why.items():
        if reason:
            raise QfineError(f"data.task_column (multi-task) does not take {what}: {reason}")


def with_task_ids(train_ds, cfg):
    """(task names, the dataset with an int ``task_id`` column, a line counting rows per task)."""
    names = task_names(train_ds["task"])
    ids = [names.index(t) for t in train_ds["task"]]
    train_ds = train_ds.remove_columns("task").add_column("task_id", ids)
    per = ", ".join(f"{n} {ids.count(i)}" for i, n in enumerate(names))
    return names, train_ds, f"tasks ({cfg.data.task_column}): {per} rows"
