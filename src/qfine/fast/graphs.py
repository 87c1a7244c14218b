"""A training step's forward and backward captured as one CUDA graph and replayed.

At small batches a QLoRA step is bound by the host, not the GPU: for Llama-3-8B at 2×2048 tokens
the fused layers' kernels take ≈255 ms of GPU time, but issuing them from Python (autograd
Functions, ``torch.compile`` guards, transformers' module calls) takes longer, so the GPU waits.
Replaying a captured graph issues the whole forward + backward with one call.

:class:`GraphedStep` wraps a callable that runs forward and backward for one batch and returns the
loss. For the first batch shape it runs ``warmup`` calls eagerly (compiling and autotuning every
kernel; these are real training steps), then captures one call into a graph — on a private memory
pool shared by all shapes — and replays it for every later batch of that shape, after copying the
batch into the graph's static input tensors. Later shapes are captured at first sight: the compiled
kernels take dynamic token counts, and an eager warm-up would hold a second copy of the step's
working memory beside the pool the first graph keeps (for Llama-3-8B at 2×2048 that would add
≈12 GiB); a kernel that would recompile for the new shape is recorded unfused instead
(``ops.eager_in_capture`` counts them), which is slower but the same math. Gradients accumulate into
the trainable parameters' ``.grad`` exactly as eagerly: the graph adds into fixed gradient buffers,
which are re-attached (and zeroed) whenever the optimizer's ``zero_grad(set_to_none=True)`` dropped
them, so gradient accumulation and any optimizer work unchanged.

What a captured step must be (checked where it can be, else the capture fails and the step runs
eagerly from then on, with one warning): no host synchronisation (``.item()``, data-dependent
shapes), no randomness drawn by modules (dropout modules are refused up front: a replay would reuse
the capture's random numbers; the fused layers' LoRA dropout draws its seeds with ``torch.randint`` on
the device, which a replay draws anew), shapes fixed per input shape. The arithmetic is the eager step's, kernel for kernel; the
GPU test checks gradients are bit-identical to the eager ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from qfine.compat.torch import foreach_zero_, is_dropout
from qfine.fast import step
from qfine.fast.stream import stream_of
from qfine.quant import KINDS


def random_modules(model: torch.nn.Module) -> list[str]:
    """Names of modules that draw random numbers in training (dropout with p > 0), leaving out those
    inside a layer that draws its randomness itself (``draws_fused_randomness()``: the fused layers'
    LoRA dropout takes its masks from seeds drawn on the device, which a replay draws anew)."""
    covered: set[int] = set()
    for module in model.modules():
        check = getattr(module, "draws_fused_randomness", None)
        if callable(check) and check():
            covered.update(id(m) for m in module.modules())
    names = []
    for name, module in model.named_modules():
        if is_dropout(module) and module.p > 0 and id(module) not in covered:
            names.append(name or type(module).__name__)
    return names


def host_synchronising_modules(model: torch.nn.Module) -> list[str]:
    """Names of modules whose forward waits for the host (a base-weight kind marked ``host_sync``: LLM.int8()
    finds outlier columns with a data-dependent nonzero). A capture through one fails, and a failed capture
    leaves the CUDA generator unusable for the rest of the process, so such models are never captured."""
    return [name for name, m in model.named_modules() if (kind := KINDS.of(m)) is not None and kind.host_sync]


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict           # name -> static input tensor the graph reads
    loss: torch.Tensor     # static output the graph writes
    keep: list             # pinned host buffers the graph copies into (offloaded checkpoints)


class GraphedStep:
    """``step(**batch)`` → the loss, via a CUDA graph per batch shape once warmed up.

    ``fn(**batch)`` must run the forward and the backward and return the loss (detached or not);
    ``params`` are the trainable parameters whose ``.grad`` the backward fills. Tensors in ``batch``
    are copied into the graph's inputs; other values must be hashable and are part of the key.
    On CPU, with ``enabled=False``, or once a capture has failed, every call runs ``fn`` eagerly.
    """

    def __init__(self, fn, params, warmup: int = 2, max_shapes: int = 4, enabled: bool = True,
                 model: torch.nn.Module | None = None):
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        self.warmup = warmup
        self.max_shapes = max_shapes
        self.reason: str | None = None if enabled else "disabled"
        if self.reason is None and model is not None and _streamed(model):
            self.reason = "weight streaming: each layer's weights are swapped in between its kernels"
        if self.reason is None and model is not None and (rnd := random_modules(model)):
            self.reason = f"random modules in training ({', '.join(rnd[:3])}): a replay would repeat their draws"
        if self.reason is None and model is not None and (sync := host_synchronising_modules(model)):
            self.reason = (f"{len(sync)} bitsandbytes int8 layers ({sync[0]}, ...): their matmul reads outlier "
                           "columns on the host, which a capture cannot do")
        self._graphs: dict = {}
        self._seen: dict = {}
        self._grads: list[torch.Tensor] | None = None
        self._pool = None
        self._stream = None
        self.capture_reserved: list[int] = []  # bytes the allocator reserved while capturing, per graph
        self.replays = 0   # calls served by a graph
        self.calls = 0

    @property
    def graphs(self) -> int:
        """How many batch shapes have a captured graph."""
        return len(self._graphs)

    def _key(self, batch: dict):
        key = []
        for name in sorted(batch):
            value = batch[name]
            if isinstance(value, torch.Tensor):
                if not value.is_cuda:
                    return None
                key.append((name, tuple(value.shape), value.dtype, value.device))
            else:
                try:
                    hash(value)
                except TypeError:
                    return None
                key.append((name, value))
        return tuple(key)

    def summary(self) -> str:
        """One line: how many calls were replayed, from how many captured shapes (or why none)."""
        why = f"; {self.reason}" if self.reason else ""
        return (f"CUDA graphs: {self.replays} of {self.calls} steps replayed from {self.graphs} captured batch "
                f"shape(s){why}")

    def __call__(self, **batch) -> torch.Tensor:
        self.calls += 1
        key = self._key(batch) if self.reason is None and torch.cuda.is_available() else None
        if key is None:
            return self.fn(**batch)
        entry = self._graphs.get(key)
        if entry is None:
            seen = self._seen[key] = self._seen.get(key, 0) + 1
            warmup = 0 if self._graphs else self.warmup  # later shapes: see the module docstring
            if seen <= warmup or len(self._graphs) >= self.max_shapes:
                return self._eager_on_capture_stream(batch) if seen == warmup else self.fn(**batch)
            entry = self._capture(key, batch)
            if entry is None:
                return self.fn(**batch)
        for name, static in entry.inputs.items():
            if batch[name] is not static:
                static.copy_(batch[name])
        self._bind_grads()
        entry.graph.replay()
        self.replays += 1
        return entry.loss.clone()  # the static output is overwritten by the next replay

    def _capture_stream(self) -> "torch.cuda.Stream":
        """The side stream warm-up and capture run on, after handing every cached block back: cached
        blocks belong to the stream that freed them, so without this the side stream (and then the
        graph's pool) would reserve a second copy of the step's working memory."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return self._stream

    def _eager_on_capture_stream(self, batch):
        """The last warm-up step runs on the stream the capture will use, so per-stream lazy state
        (cuBLAS workspaces) exists before capturing, as the CUDA-graph notes advise."""
        stream = self._capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loss = self.fn(**batch)
        torch.cuda.current_stream().wait_stream(stream)
        return loss

    def _bind_grads(self):
        """Point every ``.grad`` at the buffer the graphs accumulate into; zero the ones that were
        dropped (set to None), copy in any gradient that was replaced by another tensor."""
        if self._grads is None:  # the first binding adopts existing gradients; missing ones are zeroed below
            self._grads = [p.grad if p.grad is not None else torch.empty_like(p) for p in self.params]
        dropped = []
        for p, g in zip(self.params, self._grads):
            if p.grad is g:
                continue
            if p.grad is None:
                dropped.append(g)
            else:
                g.copy_(p.grad)
            p.grad = g
        if dropped:
            foreach_zero_(dropped)

    def _capture(self, key, batch) -> _Graph | None:
        inputs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self._bind_grads()
        stream = self._capture_stream()
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        reserved = torch.cuda.memory_reserved()
        keep: list = []
        try:
            # thread_local: other threads may go on with calls a capture forbids — the data loader's
            # pin-memory thread allocates pinned memory while a step is being captured
            with step.step_mode(graph_keep=keep), torch.cuda.graph(graph, pool=self._pool, stream=stream,
                                                     capture_error_mode="thread_local"):
                loss = self.fn(**inputs)
        except Exception as e:  # noqa: BLE001 — an uncapturable step still trains, eagerly
            self.reason = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            warnings.warn(f"qfine: CUDA graph {self.reason}; running the training step eagerly")
            torch.cuda.synchronize()
            return None
        self.capture_reserved.append(torch.cuda.memory_reserved() - reserved)
        entry = _Graph(graph, {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}, loss.detach(), keep)
        self._graphs[key] = entry
        return entry

    def reset(self):
        """Drop every captured graph (their memory pool and the pinned buffers they write are freed
        once nothing else holds them)."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None


def _streamed(model) -> bool:

    return stream_of(model) is not None
