"""Sequence classification (``model.task: seq-cls``): a label per text.

The base model gets a classification head (``AutoModelForSequenceClassification``; Llama-style
decoders pool the last non-pad token into ``score``), which starts random, is trained in full
(peft's ``modules_to_save``) and is never quantized. The label set is read from the training data —
names or integers, sorted — saved with the run (``labels.json`` and the model config's
``id2label``) and checked against every evaluation row.
"""

from __future__ import annotations

import torch
import transformers
from transformers import DataCollatorWithPadding

from qfine.config import DataConfig, RunConfig
from qfine.data.rows import RowStats, column, first_fields, in_memory_datasets, no_rows, read_fields
from qfine.objectives.base import Objective, Supports
from qfine.util.errors import QfineError


def _label_name(row: dict, cfg: DataConfig, where: str) -> str:
    col = column(row, "label", cfg, where)
    value = row[col]
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise QfineError(f"{where}: column {col!r} (label) is missing or empty")
    if isinstance(value, float):
        if not value.is_integer():
            raise QfineError(f"{where}: label {value!r} in column {col!r} is not a class (a whole number or a name)")
        value = int(value)
    if not isinstance(value, (int, str)):
        raise QfineError(f"{where}: label in column {col!r} must be a name or an integer, got {type(value).__name__}")
    return str(value).strip()


def _sorted_labels(names) -> list[str]:
    names = set(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def label_set(cfg: DataConfig) -> list[str]:
    """The sorted class names found in the training data ``cfg.path`` (at least two)."""
    stats = RowStats()
    names = [v[0] for _, v in read_fields(cfg.path, cfg, ("label",), stats, {"label": lambda r, w: _label_name(r, cfg, w)})]
    if not names:
        raise no_rows(cfg.path, stats)
    labels = _sorted_labels(names)
    if len(labels) < 2:
        raise QfineError(f"{cfg.path}: every row has the label {labels[0]!r}; a classifier needs at least two classes")
    return labels


def encoded(spec, tokenizer, cfg: DataConfig, labels: list[str]) -> tuple[list[dict], RowStats]:
    """``{"input_ids", "labels"}`` per usable row of ``spec``, texts cut at ``cfg.max_seq_len`` tokens;
    a label outside ``labels`` is a bad row."""
    ids = {name: i for i, name in enumerate(labels)}

    def label_id(row, where):
        name = _label_name(row, cfg, where)
        if name not in ids:
            raise QfineError(f"{where}: label {name!r} is not one of the training labels ({', '.join(labels)})")
        return ids[name]

    stats = RowStats()
    out = []
    for _, (text, label) in read_fields(spec, cfg, ("text", "label"), stats, {"label": label_id}):
        tokens = tokenizer(text, truncation=False)["input_ids"]
        stats.lengths.append(len(tokens))
        if len(tokens) > cfg.max_seq_len:
            stats.truncated += 1
            tokens = tokens[: cfg.max_seq_len]
        stats.tokens += len(tokens)
        out.append({"input_ids": tokens, "labels": label})
    if not out:
        raise no_rows(spec, stats)
    return out, stats


def build_datasets(tokenizer, cfg: DataConfig, labels: list[str], seed: int = 42):
    """(train, eval or None, stats of the training rows) as ``datasets.Dataset``s."""
    return in_memory_datasets(lambda spec: encoded(spec, tokenizer, cfg, labels), cfg, seed, "seq-cls")



def scores(predicted: list[int], gold: list[int], n: int) -> dict:
    """Accuracy and macro-F1 (both 0–100) and the confusion matrix ``[gold][predicted]`` (counts)."""
    confusion = [[0] * n for _ in range(n)]
    for p, g in zip(predicted, gold):
        confusion[g][p] += 1
    total = len(gold)
    f1s = []
    for c in range(n):
        tp = confusion[c][c]
        fp = sum(confusion[g][c] for g in range(n)) - tp
        fn = sum(confusion[c]) - tp
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": 100.0 * sum(confusion[c][c] for c in range(n)) / max(total, 1),
            "macro_f1": 100.0 * sum(f1s) / n, "confusion": confusion}


def trainer_metrics(eval_pred) -> dict[str, float]:
    """Trainer's ``compute_metrics``: accuracy and macro-F1 from the eval logits."""
    logits, gold = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    predicted = logits.argmax(-1).tolist()
    result = scores(predicted, [int(g) for g in gold], logits.shape[-1])
    return {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}


@torch.no_grad()
def probabilities(model, tokenizer, texts: list[str], max_len: int = 512, batch_size: int = 8) -> torch.Tensor:
    """Class probabilities (len(texts), num_labels) of ``model`` as it is now, fp32 on the CPU."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i: i + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt").to(device)
        out.append(model(**enc).logits.float().softmax(-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def dataset_scores(model, tokenizer, rows, n: int, batch_size: int = 8) -> dict:
    """:func:`scores` of ``model`` (as it is now, in eval mode for the call) on tokenized rows
    (``input_ids``, ``labels``: a Dataset or a list of dicts)."""

    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predicted, gold = [], []
    try:
        rows = list(rows)
        for i in range(0, len(rows), batch_size):
            batch = collate([{"input_ids": r["input_ids"]} for r in rows[i: i + batch_size]]).to(device)
            predicted += model(**batch).logits.argmax(-1).tolist()
            gold += [int(r["labels"]) for r in rows[i: i + batch_size]]
    finally:
        model.train(was_training)
    return scores(predicted, gold, n)


def predict(model, tokenizer, texts: list[str], labels: list[str], max_len: int = 512) -> list[dict]:
    """``{"label", "probabilities": {name: p}}`` per text."""
    probs = probabilities(model, tokenizer, texts, max_len)
    return [{"label": labels[int(p.argmax())], "probabilities": {n: round(float(v), 4) for n, v in zip(labels, p)}}
            for p in probs]


def confusion_table(confusion: list[list[int]], labels: list[str]) -> str:
    """A plain-text confusion matrix: one row per true label, one column per predicted label."""
    corner = "true \\ pred"
    width = max(len(corner) - 2, *(len(n) for n in labels))
    head = f"{corner:<{width + 2}}" + "".join(f"{n:>{width + 2}}" for n in labels)
    lines = [head] + [f"{labels[g]:<{width + 2}}" + "".join(f"{c:>{width + 2}}" for c in row)
                      for g, row in enumerate(confusion)]
    return "\n".join(lines)


class Classify(Objective):
    """A label per text on a classification head; accuracy and macro-F1 at each evaluation."""

    name = "classify"
    task = "seq-cls"
    supports = Supports(perplexity=False)
    sample_field = "text"

    def labels(self, cfg: RunConfig) -> list[str]:
        return label_set(cfg.data)

    def datasets(self, tokenizer, cfg: RunConfig, labels):
        return build_datasets(tokenizer, cfg.data, labels, cfg.train.seed)

    def trainer(self, model, tokenizer, train_ds, eval_ds, cfg: RunConfig, arguments, callbacks):
        return transformers.Trainer(model=model, args=arguments(transformers.TrainingArguments),
                                    train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                    data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks,
                                    compute_metrics=trainer_metrics)

    def sample_inputs(self, cfg: RunConfig, source: str, n: int) -> list:
        return first_fields(source, cfg.data, self.sample_field, n)

    def answer(self, model, tokenizer, inputs: list, cfg: RunConfig, labels) -> list[str]:
        return [f"{p['label']} ({p['probabilities'][p['label']]:.2f})"
                for p in predict(model, tokenizer, inputs, labels, cfg.data.max_seq_len)]

    def predict(self, loaded, texts: list[str], gen) -> list[dict]:
        return predict(loaded.model, loaded.tokenizer, texts, loaded.labels, loaded.data.max_seq_len)
