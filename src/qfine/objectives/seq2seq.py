"""Sequence to sequence (``model.task: seq2seq``): encoder-decoder models (T5, BART families) that map
a source text to a target text (summaries, translations), in 4-bit, 8-bit or 16-bit.

Sources are cut at ``data.max_seq_len`` tokens, targets at ``data.max_target_len``; the loss covers
the target tokens. Generation follows the run's ``generation`` settings (beams, length penalty,
minimum and maximum new tokens).
"""

from __future__ import annotations

import torch
import transformers

from qfine.config import DataConfig, GenerationSettings, RunConfig
from qfine.data.rows import RowStats, first_fields, in_memory_datasets, no_rows, read_fields
from qfine.objectives.base import Objective, Supports
from qfine.util.errors import QfineError

# T5's feed-forward activations overflow fp16 (transformers keeps its ``wo`` in fp32 for that reason,
# which bitsandbytes cannot do for a quantized ``wo``): such models train in bf16 or fp32 instead
FP16_UNSAFE = ("t5", "mt5", "umt5", "longt5", "switch_transformers")


def encoded(spec, tokenizer, cfg: DataConfig) -> tuple[list[dict], RowStats]:
    """``{"input_ids", "labels"}`` per usable row of ``spec``."""
    stats = RowStats()
    out = []
    for _, (source, target) in read_fields(spec, cfg, ("source", "target"), stats):
        ids = tokenizer(source, truncation=False)["input_ids"]
        stats.lengths.append(len(ids))
        if len(ids) > cfg.max_seq_len:
            stats.truncated += 1
            ids = ids[: cfg.max_seq_len]
        labels = tokenizer(text_target=target, truncation=True, max_length=cfg.max_target_len)["input_ids"]
        stats.tokens += len(ids) + len(labels)
        out.append({"input_ids": ids, "labels": labels})
    if not out:
        raise no_rows(spec, stats)
    return out, stats


def build_datasets(tokenizer, cfg: DataConfig, seed: int = 42):
    """(train, eval or None, stats of the training rows) as ``datasets.Dataset``s."""
    return in_memory_datasets(lambda spec: encoded(spec, tokenizer, cfg), cfg, seed, "seq2seq")



def safe_precision(precision: str, model_type: str, bf16_ok: bool) -> tuple[str, str | None]:
    """``precision`` unless fp16 would overflow this architecture: then bf16 where the device has it,
    else fp32, with a line saying why."""
    if precision != "fp16" or model_type not in FP16_UNSAFE:
        return precision, None
    chosen = "bf16" if bf16_ok else "fp32"
    return chosen, (f"train.precision fp16 → {chosen}: {model_type} activations overflow fp16 (transformers "
                    "keeps its feed-forward output in fp32, which a quantized layer cannot be)")


def generation_kwargs(gen: GenerationSettings, tokenizer) -> dict:
    """``model.generate`` keyword arguments for ``gen`` (beam search when num_beams > 1)."""
    if gen.num_beams < 1 or gen.max_new_tokens < 1 or gen.min_new_tokens < 0:
        raise QfineError("generation: num_beams and max_new_tokens must be at least 1, min_new_tokens at least 0")
    kw = dict(num_beams=gen.num_beams, max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens,
              do_sample=False, pad_token_id=tokenizer.pad_token_id)
    if gen.num_beams > 1:
        kw.update(length_penalty=gen.length_penalty, early_stopping=True)
    return kw


@torch.no_grad()
def generate(model, tokenizer, sources: list[str], gen: GenerationSettings, max_len: int = 512,
             batch_size: int = 8) -> list[str]:
    """The model's output text for each source (special tokens dropped)."""
    device = next(model.parameters()).device
    out = []
    kw = generation_kwargs(gen, tokenizer)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(sources), batch_size):
            enc = tokenizer(sources[i: i + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt").to(device)
            ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
            out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [t.strip() for t in out]


class Seq2Seq(Objective):
    """Source → target on an encoder-decoder; the loss on the target tokens."""

    name = "seq2seq"
    task = "seq2seq"
    supports = Supports()
    sample_field = "source"

    def datasets(self, tokenizer, cfg: RunConfig, labels):
        return build_datasets(tokenizer, cfg.data, cfg.train.seed)

    def precision(self, precision: str, model, bf16_ok: bool) -> tuple[str, str | None]:
        return safe_precision(precision, model.config.model_type, bf16_ok)

    def trainer(self, model, tokenizer, train_ds, eval_ds, cfg: RunConfig, arguments, callbacks):
        collator = transformers.DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
        return transformers.Seq2SeqTrainer(model=model, args=arguments(transformers.Seq2SeqTrainingArguments),
                                           train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                           data_collator=collator, callbacks=callbacks)

    def sample_inputs(self, cfg: RunConfig, source: str, n: int) -> list:
        return first_fields(source, cfg.data, self.sample_field, n)

    def answer(self, model, tokenizer, inputs: list, cfg: RunConfig, labels) -> list[str]:
        return generate(model, tokenizer, inputs, cfg.generation, cfg.data.max_seq_len)

    def predict(self, loaded, texts: list[str], gen: GenerationSettings) -> list[dict]:
        return [{"output": t} for t in generate(loaded.model, loaded.tokenizer, texts, gen, loaded.data.max_seq_len)]
