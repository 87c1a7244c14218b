"""Frozen decoder-layer weights kept in pinned host memory and brought to the GPU one layer ahead.

A Llama-3.1-70B base in NF4 is ≈ 37 GiB: more than a 24 GiB card holds, before any activation.
Training only ever needs the frozen weights of the layer being computed, so with streaming every
decoder layer's large frozen tensors (4-bit packed weights and their absmax, or 16-bit weights) live
in pinned host memory, and each layer's are copied to the GPU on a side stream while the previous
layer computes:

* forward: entering layer i waits for its copy and starts layer i+1's; leaving it frees layer i's
  copy when nothing will differentiate through it (a checkpointed layer's ungraded forward, eval);
* backward (checkpointed layers): the recompute of layer i enters the layer again — its copy is
  fetched, layer i-1's is started — and the copy is freed when the gradient of the layer's input is
  complete, which is the end of that layer's backward (a hook on the input tensor).

At most two layers' weights are on the GPU at a time (the one computing and the one arriving): the
copies are allocated in the compute stream's order and the copy stream first waits for the compute
stream, so a dropped layer's memory is reused at once, and the copy that overwrites it runs only after
the kernels still reading it (:meth:`WeightStream.prefetch`; measured: two copies at the peak on a 70B
shape, docs/benchmarks.md). What moves
is the tensors' storage only (``param.data``, ``quant_state.absmax``): the modules, parameters and
state-dict keys stay as they are, and the fused functions read whatever storage is in place when they
run — which is the GPU copy throughout the layer's forward, recompute and backward. Without
checkpointing every graded forward keeps its layers' copies until their backward (correct, but
nothing saved), so ``qfine train`` turns checkpointing on whenever it streams.

Small tensors (norm weights, the nested absmax constants) stay on the GPU: copying them would cost
more launches than the bytes are worth. On the CPU there is nowhere to stream from; the tests run the
same schedule there with ``poison=True``, where an evicted tensor reads as NaN/zero bytes, so any
use of a weight outside its window changes the numbers.
"""

from __future__ import annotations

import torch

from qfine.fast import step
from qfine.fast.offload import set_streamer, streamer
from qfine.fast.swap import causal_lm
from qfine.memory.estimate import STREAM_MIN_BYTES
from qfine.quant import KINDS
from qfine.quant.registry import dense_tensors

MIN_BYTES = STREAM_MIN_BYTES  # tensors smaller than this stay on the GPU


class _Slot:
    """One streamed tensor: where it is attached (a parameter's ``.data`` or an attribute of an
    object such as a bitsandbytes ``QuantState``), its host copy, and what sits there when evicted."""

    def __init__(self, owner, attr: str, host: torch.Tensor, evicted: torch.Tensor):
        self.owner, self.attr, self.host, self.evicted = owner, attr, host, evicted

    def set(self, t: torch.Tensor) -> None:
        if self.attr == "data":
            self.owner.data = t
        else:
            setattr(self.owner, self.attr, t)


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan")) if t.is_floating_point() else torch.zeros_like(t)


class WeightStream:
    """The streamed tensors of each decoder layer and the copies now on (or on their way to) the GPU.

    ``layers``: the decoder layers in order; ``device``: where they compute; ``keep_last``: how many of
    the last layers keep their weights on the device (memory to spare buys fewer copies: the forward of
    a short sequence is bound by the host-to-device copies). Built by :func:`install`.
    """

    def __init__(self, layers, device: torch.device, min_bytes: int = MIN_BYTES, poison: bool = False,
                 keep_last: int = 0):
        self.layers = list(layers)
        self.owner = layers  # the ModuleList: the key qfine.fast.offload records this streamer under
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.poison = poison
        streamed = len(self.layers) - max(0, keep_last)  # the last keep_last layers stay on the device
        self.slots: list[list[_Slot]] = [self._collect(layer, min_bytes) if i < streamed else []
                                         for i, layer in enumerate(self.layers)]
        self.copies: dict[int, tuple[list[torch.Tensor], object]] = {}  # layer → (tensors, ready event)
        self.resident: set[int] = set()
        self.fetches = 0        # copies started (a test and the benchmark read these)
        self.max_resident = 0   # most layers with a copy at once
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.streamed_bytes = sum(s.host.numel() * s.host.element_size() for slots in self.slots for s in slots)
        self._hooks = []
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(self._post_hook(i)))

    # ---- placement -------------------------------------------------------------------------------
    def _collect(self, layer: torch.nn.Module, min_bytes: int) -> list[_Slot]:
        """Move the layer's frozen base tensors of at least ``min_bytes`` to host memory; return them."""
        found, seen = [], set()
        for name, module in layer.named_modules():
            if any(part.startswith("lora_") for part in name.split(".")):
                continue  # adapters, frozen or not, stay put: a frozen one may train later (multi-task)
            kind = KINDS.of(module)
            # a base linear streams what its kind names; any other module (a norm) its frozen parameters
            tensors = kind.streamed(module) if kind is not None else dense_tensors(module)
            for owner, attr, t in tensors:
                key = (id(owner), attr)
                if key in seen or t.numel() * t.element_size() < min_bytes:
                    continue
                seen.add(key)
                found.append((owner, attr, t))
        slots = []
        for owner, attr, t in found:
            if self.cuda:  # straight into pinned memory: no pageable copy on the way
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t)
            else:
                host = t.detach().to("cpu")
                if self.poison and host is t:
                    host = t.clone()  # the poison must not overwrite the only copy
            slot = _Slot(owner, attr, host, _poisoned(host) if self.poison else host)
            slot.set(slot.evicted)
            slots.append(slot)
        return slots

    # ---- the schedule --------------------------------------------------------------------------
    def prefetch(self, i: int) -> None:
        """Start copying layer ``i``'s tensors to the device (no-op if they are there or arriving).

        The device buffers are allocated on the compute stream and the side stream first waits for
        the compute stream's queued work: the allocator then reuses a dropped layer's memory in
        stream order, so the device holds the layers the host-side window holds, however far the CPU
        runs ahead of the GPU. (Buffers allocated on the side stream and freed under ``record_stream``
        are reused only once the GPU has caught up: measured on a 70B model, every layer's copy stayed
        cached, 32 GiB more reserved than allocated.)"""
        if not 0 <= i < len(self.layers) or i in self.copies or not self.slots[i]:
            return
        self.fetches += 1
        if not self.cuda:
            self.copies[i] = ([s.host.clone() for s in self.slots[i]], None)
        else:
            current = torch.cuda.current_stream(self.device)
            tensors = [torch.empty(s.host.shape, dtype=s.host.dtype, device=self.device) for s in self.slots[i]]
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                for t, slot in zip(tensors, self.slots[i]):
                    t.copy_(slot.host, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
            self.copies[i] = (tensors, ready)
        self.max_resident = max(self.max_resident, len(self.copies))

    def use(self, i: int) -> None:
        """Make layer ``i``'s copies the tensors its modules read (waiting for them on this stream)."""
        if i in self.resident or not self.slots[i]:
            return
        self.prefetch(i)
        tensors, ready = self.copies[i]
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        for slot, t in zip(self.slots[i], tensors):
            slot.set(t)
        self.resident.add(i)

    def drop(self, i: int) -> None:
        """Put layer ``i``'s host tensors (or poison) back and let its device copies go."""
        if i not in self.copies:
            return
        tensors, ready = self.copies.pop(i)
        if ready is not None and i not in self.resident:
            # fetched but never used: the copy must be done before the compute stream reuses the memory
            torch.cuda.current_stream(self.device).wait_event(ready)
        for slot in self.slots[i]:
            slot.set(slot.evicted)
        self.resident.discard(i)
        del tensors

    def drop_all(self) -> None:
        for i in list(self.copies):
            self.drop(i)

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("qfine: streamed weights cannot be captured in a CUDA graph")
            self.use(i)
            # a checkpoint recompute runs the layers last to first; everything else first to last
            self.prefetch(i - 1 if step.current().recompute else i + 1)
            x = args[0] if args else kwargs.get("hidden_states")
            if _graded(x):
                # the layer's backward ends when its input's gradient is complete
                x.register_hook(lambda grad, i=i: self.drop(i))
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and not step.current().ungraded_forward):
                self.drop(i)  # nothing will differentiate through this call
        return hook

    def remove(self) -> None:
        """Back to ordinary placement: every streamed tensor on the device for good, hooks gone."""
        for h in self._hooks:
            h.remove()
        self.drop_all()
        for slots in self.slots:
            for slot in slots:
                slot.set(slot.host.to(self.device))
        if streamer(self.owner) is self:
            set_streamer(self.owner, None)
        self.slots = [[] for _ in self.layers]


def _graded(x) -> bool:
    return (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()
            and not step.current().ungraded_forward)


def decoder_layers(model) -> torch.nn.ModuleList | None:

    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def stream_of(model) -> WeightStream | None:
    """The :class:`WeightStream` installed on ``model``'s decoder layers, or None."""
    layers = decoder_layers(model)
    return streamer(layers)


def install(model, device, min_bytes: int | None = None, poison: bool = False, keep_last: int = 0) -> WeightStream:
    """Stream ``model``'s decoder-layer frozen weights from pinned host memory (module docstring) and
    put everything else on ``device`` (a model staged on the CPU by :func:`qfine.load_model` moves
    there now; a model already on the device keeps its other tensors in place). Install after the
    adapters are added, so they are created next to the weights. ``min_bytes``: smaller tensors stay on
    the device (default :data:`MIN_BYTES`). Idempotent."""
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError("weight streaming needs a decoder-only model with model.layers")
    current = stream_of(model)
    if current is not None:
        return current
    stream = WeightStream(layers, device, MIN_BYTES if min_bytes is None else min_bytes, poison, keep_last)
    set_streamer(layers, stream)  # the checkpoint function drives the schedule of checkpointed layers
    streamed = {(id(s.owner), s.attr) for slots in stream.slots for s in slots}
    device = torch.device(device)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if (id(param), "data") not in streamed and param.device != device:
                param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
        _place_quant_state(module, device, streamed)
    if stream.cuda:
        torch.cuda.empty_cache()  # the device copies the host took over go back to the card
    return stream


def _place_quant_state(module, device: torch.device, streamed: set) -> None:
    """The small tensors of a 4-bit weight's quantization state (code, offset, nested state) on the
    device; a streamed absmax (its (id(owner), attr) in ``streamed``) keeps its host copy."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return
    for owner in (state, getattr(state, "state2", None)):
        if owner is None:
            continue
        for attr in ("absmax", "code", "offset"):
            t = getattr(owner, attr, None)
            if isinstance(t, torch.Tensor) and t.device != device and (id(owner), attr) not in streamed:
                setattr(owner, attr, t.to(device))

