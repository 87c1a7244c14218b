"""transformers' private symbols that qfine uses, each with why (pinned by tests/test_compat.py)."""

from __future__ import annotations

# Attribute of a GradientCheckpointingLayer holding the function that runs the layer under checkpointing
# (transformers calls ``self._gradient_checkpointing_func(self.__call__, ...)``): qfine's recompute, with
# offloaded inputs and streamed weights, is installed there per layer instance instead of patching the class.
CHECKPOINT_FUNC = "_gradient_checkpointing_func"

# Private Trainer methods qfine's trainers override (tests/test_compat.py checks each still exists with the
# parameters named here): per-step host syncs of grad-norm clipping and token counting that a CUDA-graphed
# step must avoid, the checkpoint write that must flush the device-side token count first, and the sampler
# and signature columns of multi-task batches. transformers offers no callback for any of them.
TRAINER_OVERRIDES = {
    "_clip_grad_norm": ("model",),
    "_get_grad_norm": ("model", "grad_norm"),
    "_track_num_input_tokens": ("inputs",),
    "_save_checkpoint": ("model", "trial"),
    "_set_signature_columns_if_needed": (),
    "_get_train_sampler": (),
}


def attn_implementation(config) -> str | None:
    """``config._attn_implementation``: the attention function a model's layers call (read from the
    config, as transformers' own layers do; the public ``attn_implementation`` is only the request)."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config, name: str) -> None:
    """Select a registered attention function (``AttentionInterface.register``) for an already loaded
    model: its layers read ``config._attn_implementation`` at every call."""
    config._attn_implementation = name
