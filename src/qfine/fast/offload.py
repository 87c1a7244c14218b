"""Gradient checkpointing with the checkpointed layer inputs kept in pinned host memory.

Full checkpointing keeps one tensor per decoder layer on the GPU — its input hidden state
(batch, seq, d) — and recomputes the layer in the backward. For Llama-3-8B at 2×2048 tokens that is
32 × 32 MiB = 1 GiB, the largest activation left. Here each input is copied to pinned CPU memory on
a side stream as soon as the layer has consumed it (overlapping the next layers' compute) and copied
back in the backward, one layer ahead of need: while layer i is recomputed and differentiated,
layer i-1's input is already on its way. At most two layer inputs are on the GPU at any time.

The recompute is reentrant-style (the forward runs without building a graph; the backward reruns the
layer with grad and back-propagates through it), with the RNG and autocast state of the forward
restored, as ``torch.utils.checkpoint`` does. It is installed per layer *instance* as the
``_gradient_checkpointing_func`` that transformers' ``GradientCheckpointingLayer`` calls, so no class
is touched. On CPU there is nowhere to offload to: the input is kept as is (the same arithmetic,
which is what the CPU tests check).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref

import torch

from qfine.compat.transformers import CHECKPOINT_FUNC
from qfine.fast import step

# torch's caching host allocator rounds every pinned allocation up to a power of two: one layer input
# of 1 × 344,064 tokens × 4096 × bf16 (2.6 GiB) would hold 4 GiB, and 32 of them more host memory than
# the machine has. A host copy is therefore made of power-of-two pieces, the last one (under MIN_PIECE)
# the only one rounded up.
MIN_PIECE = 1 << 20


def piece_sizes(nbytes: int) -> list[int]:
    """``nbytes`` as a sum of powers of two ≥ MIN_PIECE, largest first, and one remainder < MIN_PIECE."""
    sizes, rest = [], nbytes
    while rest >= MIN_PIECE:
        sizes.append(1 << (rest.bit_length() - 1))
        rest -= sizes[-1]
    return sizes + ([rest] if rest else [])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view."""
    return t.reshape(-1).view(torch.uint8)


class _Entry:
    """One layer input: its host copy (pinned pieces, see ``piece_sizes``), and the device copy once
    fetched back."""

    def __init__(self, x: torch.Tensor, offloader: "Offloader", prev: "_Entry | None"):
        self.prev = prev
        self.device = x.device
        self.offloader = offloader
        self.gpu = self.ready = None
        self.eager = False  # device copy allocated on the compute stream (no record_stream needed)
        self.offloaded = x.is_cuda and offloader.offload
        if self.offloaded:
            self.shape, self.dtype = x.shape, x.dtype
            src = x.contiguous()
            stream = offloader.stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is complete
            with torch.cuda.stream(stream):
                flat, at, self.host = _bytes(src), 0, []
                for n in piece_sizes(flat.numel()):
                    piece = torch.empty(n, dtype=torch.uint8, pin_memory=True)
                    piece.copy_(flat[at:at + n], non_blocking=True)
                    self.host.append(piece)
                    at += n
            if torch.cuda.is_current_stream_capturing():
                # a captured graph copies into these buffers at every replay: they must never be freed
                # back to the pinned-memory cache and handed to anyone else while the graph lives
                keep = step.current().graph_keep  # set by the capture (fast/graphs.py), else ours
                (offloader.graph_buffers if keep is None else keep).extend(self.host)
            src.record_stream(stream)  # the memory is not reused before the copy has read it
        else:
            self.host = x

    def prefetch(self):
        if self.gpu is not None or self.host is None:
            return
        if not self.offloaded:
            self.gpu = self.host
            return
        stream = self.offloader.stream(self.device)
        current = torch.cuda.current_stream(self.device)
        # Eagerly, the device buffer is allocated on the compute stream and the side stream first
        # waits for the compute stream's queued work: a freed input's memory is then reused in stream
        # order. (A buffer allocated on the side stream and freed under record_stream is reused only
        # once the GPU has caught up: under a tight memory cap, with the weights streamed, that cache
        # was what ran out.) Inside a capture every allocation comes from the graph's private pool,
        # and the side stream's allocation is what has always been captured and replayed.
        self.eager = not torch.cuda.is_current_stream_capturing()
        if self.eager:
            self.gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            stream.wait_stream(current)
        with torch.cuda.stream(stream):
            if not self.eager:
                self.gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            flat, at = _bytes(self.gpu), 0
            for piece in self.host:
                flat[at:at + piece.numel()].copy_(piece, non_blocking=True)
                at += piece.numel()
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def fetch(self) -> torch.Tensor:
        """The input back on its device (waiting for its copy), and the previous layer's on its way."""
        self.prefetch()
        x, self.gpu, self.host = self.gpu, None, None
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            if not self.eager:
                x.record_stream(current)
        if self.prev is not None:
            self.prev.prefetch()
            self.prev = None
        return x


class Offloader:
    """The side streams and the chain of saved inputs of one model's decoder layers (kept on
    the device as they are when ``offload`` is False: plain checkpointing)."""

    def __init__(self, offload: bool = True):
        self.offload = offload
        self._streams = {}
        self.graph_buffers: list[torch.Tensor] = []  # pinned buffers written by graphs others captured
        self.last: _Entry | None = None
        # the model's qfine.fast.stream.WeightStream when its frozen weights are streamed: a checkpointed
        # layer's weights are on the device only while it runs forward, and while it is recomputed
        # and differentiated in the backward (the recompute may run no module hook: transformers ≥
        # 5.24 checkpoints the layer's forward, not its __call__)
        self.weights = None

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def save(self, x: torch.Tensor, index: int) -> _Entry:
        entry = _Entry(x, self, self.last if index > 0 else None)
        self.last = entry
        return entry


def _autocast_state():
    return [(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cuda", "cpu")]


class OffloadedCheckpoint(torch.autograd.Function):
    """out = run(x) without keeping anything of the layer but a host copy of x; the backward
    recomputes run(x) with grad and back-propagates dy through it (parameter grads accumulate into
    ``.grad`` directly, as in reentrant checkpointing)."""

    @staticmethod
    def forward(ctx, run, offloader: Offloader, index: int, x):
        ctx.run = run
        # the recompute runs in the forward's step mode too (fast/step.py: e.g. the fused layers'
        # causal-only flag in fast/swap.py, set by the model's forward and gone by the backward)
        ctx.context = contextvars.copy_context()
        ctx.autocast = _autocast_state()
        ctx.rng_cpu = torch.get_rng_state()
        # a CUDA graph capture cannot read the generator's state; captured steps are refused when a
        # module draws random numbers (fast/graphs.py), and the fused layers' dropout reuses the seeds
        # of its forward in the recompute (fast/swap.py), so there is nothing to replay then
        ctx.rng_cuda = (torch.cuda.get_rng_state(x.device)
                        if x.is_cuda and not torch.cuda.is_current_stream_capturing() else None)
        ctx.weights, ctx.index = offloader.weights, index
        if ctx.weights is not None:
            ctx.weights.use(index)
            ctx.weights.prefetch(index + 1)
        with step.step_mode(ungraded_forward=True):
            out = run(x)
        if ctx.weights is not None:
            ctx.weights.drop(index)  # the backward recomputes the layer
        ctx.entry = offloader.save(x, index)
        return out

    @staticmethod
    def backward(ctx, dy):
        x = ctx.entry.fetch().detach().requires_grad_(True)
        ctx.entry = None
        weights, ctx.weights = ctx.weights, None
        if weights is not None:
            weights.use(ctx.index)
            weights.prefetch(ctx.index - 1)
        devices = [x.device] if ctx.rng_cuda is not None else []
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            torch.set_rng_state(ctx.rng_cpu)
            if ctx.rng_cuda is not None:
                torch.cuda.set_rng_state(ctx.rng_cuda, x.device)
            for dev, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
            out = ctx.context.run(_recompute, ctx.run, x)
        ctx.context = None
        torch.autograd.backward(out, dy)
        if weights is not None:
            weights.drop(ctx.index)
        return None, None, None, x.grad


def _recompute(run, x):
    with step.step_mode(recompute=True), torch.enable_grad():
        return run(x)


def _offloaded_checkpoint(offloader: Offloader, index: int, fallback, run, *args):
    """The ``_gradient_checkpointing_func`` of layer ``index``: ``run`` is the layer call with its
    keyword arguments bound, ``args`` its positional ones (the hidden state)."""
    x = args[0] if len(args) == 1 else None
    if not (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()):
        return fallback(run, *args)  # nothing would flow back through x: the stock checkpoint copes
    return OffloadedCheckpoint.apply(run, offloader, index, x)


# decoder layers (their ModuleList) → the weight streamer installed on them (qfine.fast.stream), which a
# checkpointed layer's recompute drives; weak, so a model that is dropped takes its entry along
_STREAMED: "weakref.WeakKeyDictionary[torch.nn.ModuleList, object]" = weakref.WeakKeyDictionary()


def streamer(layers) -> object | None:
    """The weight streamer installed on ``layers`` (a ModuleList), or None."""
    return _STREAMED.get(layers) if layers is not None else None


def set_streamer(layers, weights: object | None) -> None:
    """Record (or, with None, forget) the weight streamer of ``layers``; every layer checkpointed
    through this module's recompute then fetches its weights through it."""
    if weights is None:
        _STREAMED.pop(layers, None)
    else:
        _STREAMED[layers] = weights
    for layer in layers:
        func = getattr(layer, CHECKPOINT_FUNC, None)
        args = getattr(func, "args", ())
        if args and isinstance(args[0], Offloader):
            args[0].weights = weights


def install_checkpointing(layers, offload: bool) -> int:
    """Give every checkpointing decoder layer in ``layers`` (a ModuleList) this module's checkpoint
    function, with the inputs in host memory (``offload``) or left on the device. Returns how many
    layers use it (0 if checkpointing is off)."""
    offloader = Offloader(offload)
    offloader.weights = streamer(layers)
    count = 0
    for i, layer in enumerate(layers):
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        current = getattr(layer, CHECKPOINT_FUNC, None)
        fallback = getattr(current, "qfine_fallback", current)
        func = functools.partial(_offloaded_checkpoint, offloader, i, fallback)
        func.qfine_fallback = fallback
        setattr(layer, CHECKPOINT_FUNC, func)
        count += 1
    return count
