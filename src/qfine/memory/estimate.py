"""Peak GPU memory of a QLoRA training step, predicted from the model's shapes, and the checkpointing
mode that fits.

One model serves ``qfine train`` (before training, on CUDA: turn on checkpointing, then offloading,
when the chosen settings would not fit the free memory) and any planning tool that starts from a
config alone: everything is computed from :class:`Shapes` and a few settings, with the frozen
weights' size given (measured after loading, or computed from the config).

Peak = weights + trainable state + saved activations + max(loss chunk, backward working set) + slack.

Pinned host memory is estimated beside it (:attr:`Estimate.host`, not part of the GPU peak): the
streamed layers' weights as the pinned-memory cache holds them (each tensor rounded up to a power of
two, ``qfine.memory.plan.host_layer_bytes``) and, with offloaded checkpoints, every layer's input (in exact
power-of-two pieces, ``qfine/fast/offload.py``). Pinned memory cannot be swapped out: a plan that
needs more than the machine has fails while it trains, however much GPU memory is free.

* **Weights**: the frozen base on the device; with weight streaming (``qfine/fast/stream.py``) the
  decoder layers' weights live in host memory and only ``STREAM_WINDOW`` layers' copies are on the
  device at once (the one computing and the one arriving; a dropped copy's memory is reused in
  the compute stream's order).

* **Saved activations** per token per decoder layer, in the compute dtype (2 bytes), of the fused
  layers (``qfine/fast/lora.py``): the layer input and the mid-layer residual (2·d), q and the
  attention output (2·q_dim), k and v (2·kv_dim), and the stacked gate/up output (2·i). The LoRA
  products (tokens × r) and norm statistics are left out (< 1 %). By checkpoint mode:
  ``none``: every layer's; ``checkpoint``: one input (d) per layer plus one layer's set while it is
  recomputed; ``offload``: two layer inputs on the GPU plus one layer's set. In every mode two more d
  per token outside the layers: the final norm's input and the normed hidden states the chunked loss
  keeps (left out, the plan fell 7 % short at 1 × 344,064 tokens on the Llama-3.1-8B shape).
* **Backward working set** per token: the gradients one layer's backward holds at once
  (≈ 3·i + 3·d elements), plus the largest dequantized weight group (gate/up stacked, bf16).
* **Loss chunk**: the chunked cross-entropy's logits and their gradient, 2 × 256 MiB at most.
* peft's reference layers (a LoRA form the fused kernels do not take) keep more: measured 2.70× the
  fused set per token (Llama-3.1-8B shape at 2 × 2048 with LoRA dropout on the reference layers,
  H200, 2026-12-01: 37.7 GiB against 18.4); without dropout 1.92× (the bytes autograd saves, counted
  with ``saved_tensors_hooks`` on the CPU in fp32, a 4-layer Llama of hidden 512 at 2 × 256 tokens,
  2026-12-02; with dropout 0.05 that count gives 2.99×, above the GPU's measured 2.70).

Checked against the measured peaks in docs/benchmarks.md (Llama-3.1-8B and Llama-3.2-1B shapes,
H100/H200): within a few percent for the fused path without checkpointing, and above the
measured value (never below) for the checkpointed modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
MODES = ("none", "checkpoint", "offload")
_LOSS_CHUNK_BYTES = 2 * 256 * 2**20  # logits + their gradient for one chunk (qfine/fast/loss.py)
_SLACK_BYTES = 256 * 2**20           # cuBLAS workspaces, allocator rounding
REFERENCE_FACTOR = 2.70              # peft's reference layers with LoRA dropout over the fused set (module docstring)
REFERENCE_FACTOR_NO_DROPOUT = 1.92   # the same without dropout (module docstring)
# optimizer state bytes per trainable parameter (fp32 master weights and grads are counted apart)
OPTIMIZER_STATE = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2,
                   "paged_adamw_8bit": 2, "sgd": 0, "adafactor": 4}
STREAM_MIN_BYTES = 1 << 20  # streamed tensors are at least this large; smaller ones stay on the GPU
STREAM_WINDOW = 2  # decoder layers whose streamed weights are on the device at once (module docstring)
# how much of the free memory an estimate may fill: the allocator's pool fragments under changing shapes
FILL = 0.92
# how much of the host's available memory pinned buffers may take (the process, the data and the page
# cache need the rest)
HOST_FILL = 0.90


def host_available() -> int | None:
    """Bytes of host memory available now (Linux: MemAvailable), None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def offload_host_bytes(shapes: "Shapes", tokens: int, act_bytes: int = 2) -> int:
    """Pinned host bytes of offloaded checkpoints: one layer input (tokens × hidden) per decoder layer."""
    return shapes.layers * shapes.hidden * tokens * act_bytes


@dataclass(frozen=True)
class Shapes:
    """What the memory model reads from a decoder-only config."""

    layers: int
    hidden: int
    intermediate: int
    q_dim: int      # heads × head_dim
    kv_dim: int     # KV heads × head_dim
    vocab: int

    @classmethod
    def from_config(cls, config) -> "Shapes":
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        return cls(int(config.num_hidden_layers), int(config.hidden_size), int(config.intermediate_size),
                   heads * head_dim, kv * head_dim, int(config.vocab_size))

    def saved_per_token(self) -> int:
        """Elements one fused decoder layer keeps for its backward, per token."""
        return 2 * self.hidden + 2 * self.q_dim + 2 * self.kv_dim + 2 * self.intermediate

    def backward_per_token(self) -> int:
        """Elements of gradients one layer's backward holds at once, per token."""
        return 3 * self.intermediate + 3 * self.hidden

    def largest_weight(self) -> int:
        """Elements of the largest dequantized weight group (gate and up stacked)."""
        return 2 * self.intermediate * self.hidden


@dataclass
class Estimate:
    """Predicted peak bytes of one training step, by part."""

    mode: str
    weights: int
    trainable: int
    activations: int
    transient: int
    slack: int = _SLACK_BYTES
    parts: dict = field(default_factory=dict)
    stream: bool = False  # decoder-layer weights streamed from host memory
    host: int = 0         # pinned host bytes: streamed weights + offloaded layer inputs (module docstring)

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.transient + self.slack

    def line(self) -> str:
        streamed = ", weights streamed" if self.stream else ""
        return (f"{self.total / GIB:.1f} GiB with checkpointing {self.mode}{streamed} (weights {self.weights / GIB:.1f}, "
                f"adapters + optimizer {self.trainable / GIB:.2f}, activations {self.activations / GIB:.1f}, "
                f"loss/backward {self.transient / GIB:.2f}, slack {self.slack / GIB:.2f})"
                + (f"; {self.host / GIB:.1f} GiB of pinned host memory" if self.host else ""))


def trainable_bytes(params: int, optimizer: str) -> int:
    """fp32 weights and gradients of ``params`` trainable parameters plus the optimizer's state."""
    return params * (4 + 4 + OPTIMIZER_STATE.get(optimizer, 8))


def estimate(shapes: Shapes, tokens: int, mode: str, weights_bytes: int, trainable_params: int,
             optimizer: str = "adamw_torch", fused: bool = True, act_bytes: int = 2,
             dropout: bool = True, layer_bytes: int = 0, host_layer_bytes: int = 0) -> Estimate:
    """The predicted peak of a step over ``tokens`` tokens (micro-batch rows × sequence length);
    ``dropout``: whether peft's reference layers (``fused`` false) run LoRA dropout; ``layer_bytes``
    (> 0: weight streaming, checkpointed modes only): one decoder layer's streamed weights, of which
    ``STREAM_WINDOW`` layers' stay in ``weights_bytes`` instead of all of them; ``host_layer_bytes``: the
    pinned host bytes of one streamed layer (default ``layer_bytes``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if layer_bytes and mode == "none":
        raise ValueError("weight streaming needs a checkpointed mode")
    if layer_bytes:
        weights_bytes -= (shapes.layers - min(STREAM_WINDOW, shapes.layers)) * layer_bytes
    factor = 1.0 if fused else (REFERENCE_FACTOR if dropout else REFERENCE_FACTOR_NO_DROPOUT)
    per_layer = shapes.saved_per_token() * factor
    one_layer = per_layer * tokens * act_bytes
    inputs = shapes.hidden * tokens * act_bytes
    # outside every layer, in all modes: the final norm's input and the normed hidden states the loss keeps
    head = 2 * inputs
    if mode == "none":
        acts = shapes.layers * one_layer + head
    elif mode == "checkpoint":
        acts = shapes.layers * inputs + one_layer + head
    else:
        acts = 2 * inputs + one_layer + head
    backward = shapes.backward_per_token() * tokens * act_bytes + shapes.largest_weight() * act_bytes
    loss = min(_LOSS_CHUNK_BYTES, 2 * tokens * shapes.vocab * act_bytes)
    host = shapes.layers * (host_layer_bytes or layer_bytes) if layer_bytes else 0
    if mode == "offload":
        host += offload_host_bytes(shapes, tokens, act_bytes)
    return Estimate(mode, int(weights_bytes), trainable_bytes(trainable_params, optimizer), int(acts),
                    int(max(loss, backward)), stream=bool(layer_bytes), host=int(host))


def fitting_mode(shapes: Shapes, tokens: int, budget: int, weights_bytes: int, trainable_params: int,
                 optimizer: str, fused: bool, at_least: str = "none", offload_ok: bool = True,
                 dropout: bool = True):
    """(mode, estimates by mode) — the first of ``none → checkpoint → offload`` (from ``at_least`` on)
    whose estimate fits ``FILL × budget``; None when none does."""
    order = [m for m in MODES[MODES.index(at_least):] if offload_ok or m != "offload"]
    estimates = {m: estimate(shapes, tokens, m, weights_bytes, trainable_params, optimizer, fused, dropout=dropout)
                 for m in order}
    for mode in order:
        if estimates[mode].total <= FILL * budget:
            return mode, estimates
    return None, estimates
