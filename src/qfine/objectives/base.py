"""The base of every training objective (:class:`Objective`) and what it supports (:class:`Supports`);
the table of objectives is :mod:`qfine.objectives`."""

from __future__ import annotations

from dataclasses import dataclass

from qfine.config import GenerationSettings, RunConfig


@dataclass(frozen=True)
class Supports:
    """Features an objective supports (the recipe refuses or switches off the others, saying so).

    ``fast_path``: the fused GPU layers, CUDA graphs and weight streaming; ``adaptive``: adaptive
    quantization (calibrated on the run's own rows as token ids); ``multitask``: shared + per-task
    adapters; ``gguf``: GGUF export; ``requantize``: ``merge --requantize``; ``s2_attn``: LongLoRA's
    shifted sparse attention; ``perplexity``: its eval loss is a per-token loss (perplexity = exp)."""

    fast_path: bool = False
    adaptive: bool = False
    multitask: bool = False
    gguf: bool = False
    requantize: bool = False
    s2_attn: bool = False
    perplexity: bool = True


class Objective:
    """Base of the objectives; a subclass sets the class attributes and overrides the methods."""

    name: str = ""
    task: str = ""  # the model head it trains: a key of qfine.models.heads.HEADS
    supports: Supports = Supports()
    metric: str = "eval_loss"  # the eval metric that picks the best checkpoint and a sweep's default target
    greater_is_better: bool = False
    sample_field: str = "prompt"  # what a report sample and `qfine predict --data` read from a row
    reference: bool = False  # its loss compares the model with a reference model (DPO, KTO)

    def labels(self, cfg: RunConfig) -> list[str] | None:
        """The class names a labelled head is built with, read from the training rows (None: no labels)."""
        return None

    def datasets(self, tokenizer, cfg: RunConfig, labels: list[str] | None):
        """``(train, eval or None, stats)``: the run's rows tokenized for its trainer; ``stats`` has
        ``rows``, ``tokens``, ``truncated``, ``skipped`` (and optionally ``dropped``, ``no_target``)."""
        raise NotImplementedError

    def precision(self, precision: str, model, bf16_ok: bool) -> tuple[str, str | None]:
        """The training precision for this model (and a line when it differs from ``precision``)."""
        return precision, None

    def trainer(self, model, tokenizer, train_ds, eval_ds, cfg: RunConfig, arguments, callbacks):
        """The Trainer for this objective. ``arguments(args_cls, **extra)`` builds its TrainingArguments
        (or a subclass) from the config, as every objective shares them."""
        raise NotImplementedError

    def sample_inputs(self, cfg: RunConfig, source: str, n: int) -> list:
        """Up to ``n`` inputs from the data file ``source`` for the report's before/after samples."""
        raise NotImplementedError

    def shown(self, inputs: list) -> list[str]:
        """The sample inputs as the report prints them."""
        return [str(x) for x in inputs]

    def answer(self, model, tokenizer, inputs: list, cfg: RunConfig, labels: list[str] | None) -> list[str]:
        """How ``model`` (in eval mode for the call) answers each sample input."""
        raise NotImplementedError

    def predict(self, loaded, texts: list[str], gen: GenerationSettings) -> list[dict]:
        """What ``qfine predict`` prints for each input text of a loaded run: ``{"output": text}``, or
        ``{"label", "probabilities"}`` for a classifier."""
        raise NotImplementedError
