"""The mode of the training step now running, in one place.

The fused layers, the weight streamer and the offloaded checkpoint need to know where in a step they are
called from, and nothing in the layer's arguments says so (transformers calls them). One immutable
:class:`StepMode` in one context variable answers it; a block changes a field with :func:`step_mode`,
which restores the previous mode on exit (also when the block raises). Context variables, not globals:
a checkpoint recompute runs in a copy of its forward's context, so it sees the mode the forward saw.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class StepMode:
    """Where the current call sits inside a training step.

    ``ungraded_forward``: inside the graph-free first forward of an offloaded-checkpoint layer; a fused
    layer still takes its training path (its backward will recompute it with grad).
    ``recompute``: the layer is recomputed for its backward; only what it saves matters, its output value
    is never read, so work that only feeds the output (the MLP's down-projection GEMM) may be skipped.
    ``causal_only``: the causal LM's training step attends purely causally (no mask, no packed position
    ids, no window shorter than the sequence); transformers then skips the mask eagerly, but under a CUDA
    graph capture it builds an explicit (b, 1, s, s) mask, which takes SDPA off flash attention, so the
    fused layers pass none, as the eager path does.
    ``reference``: a preference loss's reference pass (no grad, adapter off or the frozen reference
    adapter): the fused layers run as in a training step, so policy and reference are computed by the
    same kernels and agree exactly where the adapter does not change them.
    ``graph_keep``: while a CUDA graph is captured, the list that keeps the pinned host buffers the graph
    writes alive exactly as long as the graph (None: the offloader keeps them as long as the model).
    """

    ungraded_forward: bool = False
    recompute: bool = False
    causal_only: bool = False
    reference: bool = False
    graph_keep: list | None = None


_MODE: contextvars.ContextVar[StepMode] = contextvars.ContextVar("qfine_step_mode", default=StepMode())


def current() -> StepMode:
    """The mode of the call now running."""
    return _MODE.get()


@contextlib.contextmanager
def step_mode(**changes) -> Iterator[StepMode]:
    """Run the block with the named fields of the current mode changed (``step_mode(recompute=True)``)."""
    mode = dataclasses.replace(_MODE.get(), **changes)
    token = _MODE.set(mode)
    try:
        yield mode
    finally:
        _MODE.reset(token)
