"""``qfine train``'s training step as a CUDA graph (:class:`qfine.fast.GraphedStep`).

TRL's ``SFTTrainer.training_step`` cannot be captured: its loss asks the host for token counts
(``.item()``) and scores only the labelled rows (a data-dependent shape), and every batch has its own
length. :class:`QfineSFTTrainer` keeps TRL's step for everything it does not take over, and with
:meth:`QfineSFTTrainer.enable_cuda_graphs` runs each training micro-batch as

    pad the batch to one of a few fixed lengths (:func:`bucket_length`) → forward with the loss
    divisor as a device tensor → backward (the same ``accelerator.backward`` Trainer calls)

through a :class:`GraphedStep`, so after the warm-up each micro-batch is one graph replay. In fp16 the
graph multiplies the loss by the loss scaler's scale tensor, which the scaler updates in place, so
every replay uses the current scale; unscaling, the overflow check and the skipped step stay outside
the graph, in the optimizer step, as eagerly. The loss
is the model's own (the fast path's chunked cross-entropy, divided by ``num_items_in_batch`` exactly
as TRL divides), so the numbers match TRL's step up to summation order; what TRL's step also logs
from the logits (``mean_token_accuracy``, ``entropy``) is not computed for graphed steps.

Padding is exact: padded positions carry label -100 (no loss) and come after every real token of
their row, so under causal attention no real token sees them — which also lets a right-padded batch
drop its attention mask and keep SDPA on flash attention, as an unpadded batch does.
"""

from __future__ import annotations

import functools

import torch
from accelerate.utils import AutocastKwargs
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qfine.compat.torch import foreach_zero_
from qfine.compat.transformers import attn_implementation
from qfine.fast import GraphedStep

_STEP_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")
# padding-free batches also carry sequence boundaries for varlen kernels (flash-attention 2, linear
# attention); SDPA and eager attention read the documents from position_ids instead
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
IGNORE = -100


def bucket_length(length: int, top: int, steps: int = 4, multiple: int = 64) -> int:
    """The padded length for a batch whose rows are ``length`` tokens: the smallest of ``steps``
    evenly spaced lengths up to ``top`` (each rounded up to a multiple of ``multiple``, at most
    ``top``) that holds it; ``length`` itself beyond ``top``."""
    for i in range(1, steps + 1):
        size = min(top, -(-(top * i // steps) // multiple) * multiple)
        if size >= length:
            return size
    return length


def pad_batch(batch: dict, length: int, pad_id: int, drop_mask: bool) -> dict:
    """``batch`` (input_ids/labels (b, s), optional attention_mask and position_ids) right-padded to
    ``length`` tokens: pad ids, label -100, mask 0, position 0. With ``drop_mask`` the attention mask
    of a right-padded batch is left out (causal attention never lets a real token see a later pad)."""
    extra = length - batch["input_ids"].shape[1]
    fill = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0, "position_ids": 0}
    out = {}
    for name, value in batch.items():
        if name == "attention_mask" and drop_mask:
            continue
        out[name] = torch.nn.functional.pad(value, (0, extra), value=fill[name]) if extra else value
    return out


def _zero_grads(params: list, set_to_none: bool = True) -> None:
    """``Module.zero_grad`` over ``params`` only."""
    if set_to_none:
        for p in params:
            p.grad = None
    elif grads := [p.grad for p in params if p.grad is not None]:
        foreach_zero_(grads)


class QfineSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer whose training micro-batches can run as CUDA graphs (off until
    :meth:`enable_cuda_graphs`); evaluation, logging and checkpoints are TRL's.

    Also takes per-step host work out of Trainer's loop, which the GPU waits for once a step is one
    graph (each host sync lets the queue run dry): gradients are zeroed, clipped and measured over the
    trainable parameters only (Trainer walks ``model.parameters()``, every 4-bit weight included), and
    the non-padding token count is summed on the device and read when logging, saving a checkpoint or
    ending the run (the only places ``state.num_input_tokens_seen`` is read) instead of with one
    ``.item()`` per micro-batch.
    """

    graphed: GraphedStep | None = None
    _param_count: int | None = None
    _trainable: list | None = None  # set for the duration of train()
    _tokens_pending: torch.Tensor | None = None

    def _single_process(self) -> bool:
        return (self.args.world_size == 1 and not self.is_deepspeed_enabled
                and not getattr(self, "is_fsdp_enabled", False))

    def _clip_grad_norm(self, model):
        if self._trainable is None or not self._single_process():
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self._trainable is not None and self._single_process():
            grad_norm = self.accelerator.clip_grad_norm_(self._trainable, float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _track_num_input_tokens(self, inputs):
        ids = inputs.get("input_ids")
        if (self.args.include_num_input_tokens_seen != "non_padding" or not self._single_process()
                or getattr(self.model, "main_input_name", "input_ids") != "input_ids"
                or not isinstance(ids, torch.Tensor)):
            return super()._track_num_input_tokens(inputs)
        # Trainer's non-padding rule: the attention mask, else tokens other than the pad id
        pad = getattr(self.processing_class, "pad_token_id", None)
        if "attention_mask" in inputs:
            n = inputs["attention_mask"].sum()
        elif pad is not None:
            n = (ids != pad).sum()
        else:
            n = torch.tensor(ids.numel(), device=ids.device)
        self._tokens_pending = n if self._tokens_pending is None else self._tokens_pending + n

    def _flush_tokens(self) -> None:
        """Add the device-side token count to ``state.num_input_tokens_seen`` (one host read)."""
        if self._tokens_pending is not None:
            self.state.num_input_tokens_seen += int(self._tokens_pending)
            self._tokens_pending = None

    def _save_checkpoint(self, model, trial):
        self._flush_tokens()  # the saved trainer state carries the count
        return super()._save_checkpoint(model, trial)

    def floating_point_ops(self, inputs: dict) -> int:
        """Trainer's estimate, 6 × tokens × non-embedding parameters, with the parameters counted once:
        counting walks every module and every 4-bit weight's subclass hooks — 12 ms a step for a 1B
        model, 24 ms for 8B, with the GPU idle behind it (Trainer calls this every micro-batch)."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._param_count is None:
            self._param_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._param_count

    def enable_cuda_graphs(self, max_len: int) -> str:
        """Route training steps through a :class:`GraphedStep` for rows up to ``max_len`` tokens;
        returns a line saying what was done (or why not)."""

        attn = attn_implementation(getattr(self.model, "config", None))
        collator = self.data_collator
        self._padding_free = bool(getattr(collator, "padding_free", False))
        if self._padding_free and attn not in ("sdpa", "eager"):
            return f"CUDA graphs off: packed batches with {attn} attention need per-batch sequence boundaries"
        step = GraphedStep(self._forward_backward, self.model.parameters(), model=self.model, max_shapes=8)
        if step.reason:
            return f"CUDA graphs off: {step.reason}"
        # TRL's collator pads on the right; another collator's mask is kept (correct, but off flash attention)
        self._drop_mask = type(collator) is DataCollatorForLanguageModeling and not self._padding_free
        self._top = max_len * (self.args.per_device_train_batch_size if self._padding_free else 1)
        self._pad_id = getattr(collator, "pad_token_id", None)
        if self._pad_id is None:
            self._pad_id = self.processing_class.pad_token_id or 0
        # autocast's cache of cast weights must be off inside a capture (PyTorch's CUDA-graph notes);
        # accelerate applies this when it wraps the model's forward at the start of train()
        self.accelerator.autocast_handler = AutocastKwargs(cache_enabled=False)
        self.graphed = step
        return (f"CUDA graphs on: each training micro-batch padded to one of 4 lengths up to {self._top} tokens "
                "and replayed as one graph after two warm-up steps")

    def train(self, *args, **kwargs):
        # Trainer zeroes gradients with model.zero_grad() after every optimizer step: a walk over every
        # module and every 4-bit weight (12 ms a step for a 1B model, GPU idle). Only the trainable
        # parameters can hold gradients, so for this run the model instance zeroes just those.
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        had = "zero_grad" in vars(model)
        if not had:
            model.zero_grad = functools.partial(_zero_grads, params)
        self._trainable = params
        try:
            return super().train(*args, **kwargs)
        finally:
            self._trainable = None
            self._flush_tokens()
            if not had:
                del model.zero_grad

    def _graph_batch(self, inputs: dict) -> dict | None:
        """The step's model inputs padded to their bucket, or None when the batch has something the
        graphed step does not take (it then runs TRL's step)."""
        if any(k not in _STEP_KEYS + _VARLEN_KEYS for k in inputs) or "labels" not in inputs:
            return None
        batch = {k: inputs[k] for k in _STEP_KEYS if isinstance(inputs.get(k), torch.Tensor)}
        return pad_batch(batch, bucket_length(batch["input_ids"].shape[1], self._top), self._pad_id, self._drop_mask)

    def _forward_backward(self, num_items: torch.Tensor, accumulation: int, **batch) -> torch.Tensor:
        """One micro-batch: forward with the fused loss (sum / ``num_items``), backward; the loss."""
        loss = self._step_model(**batch, num_items_in_batch=num_items, use_cache=False).loss
        if accumulation > 1:  # Trainer's scaling when the loss was not divided by the whole GA group's count
            loss = loss / accumulation
        self.accelerator.backward(loss)
        return loss.detach()

    def training_step(self, model, inputs, num_items_in_batch=None):
        batch = self._graph_batch(inputs) if self.graphed is not None else None
        if batch is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if not model.training:  # Trainer calls train() every step: a walk over ~1,300 modules, 13 ms for 1B
            model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        self._step_model = model
        accumulation = 1
        if num_items_in_batch is None:  # Trainer then divides by the accumulation steps itself
            num_items_in_batch = (batch["labels"][:, 1:] != IGNORE).sum()
            accumulation = self.current_gradient_accumulation_steps
        num_items = torch.as_tensor(num_items_in_batch, device=batch["input_ids"].device)
        return self.graphed(num_items=num_items.clamp_min(1), accumulation=accumulation, **batch)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        self._flush_tokens()
        # TRL's own step counts the tokens it trained on; graphed steps leave that to Trainer's
        # non-padding count (the same number without a host sync inside the step)
        metrics = getattr(self, "_metrics", None)
        if self.graphed is not None and isinstance(metrics, dict) and "train" in metrics:
            metrics["train"]["num_tokens"] = [self.state.num_input_tokens_seen]
        super().log(logs, start_time)
