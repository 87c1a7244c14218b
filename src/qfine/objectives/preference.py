"""Preference training of a causal LM (``train.objective``: dpo, simpo, orpo, kto) on the quantized base.

The reference model of DPO and KTO is the same quantized base with the adapter switched off
(``PeftModel.disable_adapter``), or, for a run started from another adapter (``train.init_adapter``),
that adapter frozen: no second copy of any base weight. Chosen and rejected go through one
forward (2B rows); the per-token log-probabilities come from the backbone's hidden states through the
frozen head in row chunks (:func:`qfine.fast.loss.linear_token_logprobs`), so the (rows, seq, vocab)
logits never exist. The losses are :mod:`.pref_loss`; the rows and batches :mod:`.pref_data`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer, TrainingArguments

from qfine.config import RunConfig
from qfine.fast import step
from qfine.fast.loss import linear_token_logprobs
from qfine.fast.swap import causal_lm
from qfine.methods.lora import reference_model
from qfine.objectives import pref_data, pref_loss, pref_reference
from qfine.objectives.base import Supports
from qfine.objectives.common import first_usable
from qfine.objectives.sft import SFT
from qfine.util.errors import QfineError


def _plain_head(lm) -> torch.nn.Linear | None:
    """The output layer when it is a frozen bias-free Linear with no logit soft-capping, else None."""
    head = lm.get_output_embeddings()
    if (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and not getattr(lm.config, "final_logit_softcapping", None)):
        return head
    return None


def sequence_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ log p, count)`` over the scored tokens of each row: fp32 (rows,) each. Through the chunked
    head when the head is plain, else through the model's logits (a trained or adapted head)."""
    lm = causal_lm(model)
    head = _plain_head(lm)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=pref_data.IGNORE)[..., 1:]  # position t scores t+1
    scored = shifted != pref_data.IGNORE
    if head is not None:
        hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logp = linear_token_logprobs(hidden, head.weight, labels)
    else:
        logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        picked = torch.gather(logits.log_softmax(-1), 2, torch.where(scored, shifted, 0).unsqueeze(-1)).squeeze(-1)
        logp = picked * scored
    return logp.sum(-1), scored.sum(-1).to(logp.dtype)


class PreferenceTrainer(Trainer):
    """A Trainer whose loss is one of :mod:`.pref_loss`'s on the collated batch; logs the rewards,
    margins, accuracies and log-probabilities (means over the logging interval, ``eval_`` in evaluation)."""

    def __init__(self, *args, kind: str, beta: float, gamma: float, reference: bool,
                 reference_table: dict[str, torch.Tensor] | None = None, **kwargs):
        """``kind``: a loss of :mod:`.pref_loss`; ``reference``: whether it compares with the reference model
        (an objective's ``reference``); ``reference_table``: its log-probabilities computed once
        (:mod:`.pref_reference`), looked up by the batch's ``row`` instead of a reference pass."""
        super().__init__(*args, **kwargs)
        self.kind, self.beta, self.gamma, self.reference = kind, beta, gamma, reference
        self.reference_table = reference_table
        # the loss is a mean over the pairs of a micro-batch: the Trainer scales it by 1/grad_accum
        self.model_accepts_loss_kwargs = False
        self._stored: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def preference_loss(self, model, inputs, split: str = "train") -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one collated batch and its metrics."""
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        logp, count = sequence_logps(model, ids, mask, labels)
        ref = None
        if self.reference and self.reference_table is not None:
            rows = inputs["row"].cpu()
            ref = torch.cat([self.reference_table[f"{split}_chosen"][rows],
                             self.reference_table[f"{split}_rejected"][rows]]).to(logp.device, logp.dtype)
        elif self.reference:
            # through the same (fused) kernels as the policy: see qfine.fast.step.StepMode.reference
            with reference_model(self.accelerator.unwrap_model(model)), step.step_mode(reference=True):
                ref, _ = sequence_logps(model, ids, mask, labels)
        half = ids.shape[0] // 2
        if self.kind == "kto":
            return pref_loss.kto(logp[:half], ref[:half], inputs["desirable"], logp[half:].detach(), ref[half:],
                                 self.beta)
        c, r = slice(0, half), slice(half, None)
        if self.kind == "dpo":
            return pref_loss.dpo(logp[c], logp[r], ref[c], ref[r], self.beta)
        if self.kind == "simpo":
            return pref_loss.simpo(logp[c], logp[r], count[c], count[r], self.beta, self.gamma)
        return pref_loss.orpo(logp[c], logp[r], count[c], count[r], self.beta)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.preference_loss(model, inputs)
        for k, v in metrics.items():
            self._stored["train"][k].append(v)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, metrics = self.preference_loss(model, inputs, "eval")
        for k, v in metrics.items():
            self._stored["eval"][k].append(v)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for k, values in self._stored[split].items():
            logs[prefix + k] = sum(values) / len(values)
        self._stored[split].clear()
        super().log(logs, start_time)

    def enable_cuda_graphs(self, max_len: int) -> str:
        return "CUDA graphs off: a preference step runs two forwards (policy and reference) per batch"


class Preference(SFT):
    """The shared part of the four preference objectives; each subclass names its loss."""

    supports = Supports(fast_path=True, gguf=True, requantize=True, perplexity=False)
    paired = True

    def datasets(self, tokenizer, cfg: RunConfig, labels):
        return pref_data.datasets(tokenizer, cfg.data, cfg.train.seed, self.paired)

    def strength(self, cfg: RunConfig) -> float:
        return cfg.train.beta or pref_loss.DEFAULTS[self.name][0]

    def trainer(self, model, tokenizer, train_ds, eval_ds, cfg: RunConfig, arguments, callbacks):
        if cfg.data.task_column:
            raise QfineError(f"train.objective {self.name} trains one adapter; data.task_column is for sft")
        args = arguments(TrainingArguments, remove_unused_columns=False)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = (pref_data.PairCollator if self.paired else pref_data.UnpairedCollator)(pad)
        table = None
        if cfg.train.reference_logps == "precompute":
            if self.name != "dpo":
                raise QfineError(f"train.reference_logps precompute serves dpo; {self.name} "
                                 + ("compares rows as they are batched (its KL term)" if self.reference
                                    else "has no reference model"))
            train_ds, eval_ds = (None if ds is None else ds.add_column("row", list(range(len(ds))))
                                 for ds in (train_ds, eval_ds))
            table = pref_reference.table(cfg.output_dir, model, {"train": train_ds, "eval": eval_ds}, sequence_logps,
                                         pad, cfg.train.batch_size)
        return PreferenceTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
                                 kind=self.name, beta=self.strength(cfg), gamma=cfg.train.simpo_gamma,
                                 reference=self.reference, reference_table=table)

    def sample_inputs(self, cfg: RunConfig, source: str, n: int) -> list:
        """The prompts of the first ``n`` usable rows."""
        read = pref_data.read_pair if self.paired else pref_data.read_unpaired
        return first_usable(source, cfg.data.split, lambda row, where: read(row, cfg.data, where).prompt, n)


class DPO(Preference):
    name = "dpo"
    reference = True


class SimPO(Preference):
    name = "simpo"


class ORPO(Preference):
    name = "orpo"


class KTO(Preference):
    name = "kto"
    reference = True
    paired = False
