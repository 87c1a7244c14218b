"""QA-LoRA (arXiv 2309.14717): a group-wise asymmetric INT4 base whose LoRA update merges into the
zero points, so the merged model is still 4-bit with its codes unchanged.

Storage of a frozen linear (out, in), groups of L input columns (g = j // L)::

    W[o, j] = d[o, g] · q[o, j] + m[o, g]        q ∈ {0..15}, d and m fp32       (GGUF Q4_1's x = d·q + m)

LoRA A sees the input pooled per group, as peft's ``QALoraLinearVariant`` computes it (the adapter is
saved in peft's format: ``use_qalora``, ``qalora_group_size``, lora_A of shape (r, in/L))::

    y = x Wᵀ + s · (p(x) Aᵀ) Bᵀ,   p(x)[g] = (in/L) · mean(x[g·L:(g+1)·L])

so the update's weight s · (BA)[o, g] · (in/L) / L is the same for every column of a group, and the
merge adds it to m[o, g]: codes and scales stay byte-identical, nothing is requantized.
"""

from __future__ import annotations

import functools
import warnings

import torch

QUANT_METHOD = "qfine_int4"  # config.json quantization_config.quant_method of a 4-bit qfine folder
# peft warns about any base layer type it does not know, although the layer class registered below serves it
warnings.filterwarnings("ignore", message=r"Unsupported layer type '<class 'qfine\.qalora\.Int4Linear'>'")


def quantize_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric INT4 of ``w`` (out, in) per group of ``group`` columns.

    Returns codes (out, in/2) uint8 (column 2k in the low nibble, 2k+1 in the high one), scales d and
    minimums m, each (out, in/group) fp32."""
    out, cols = w.shape
    g = w.detach().float().reshape(out, cols // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    d = (hi - lo) / 15
    q = torch.where(d[..., None] > 0, ((g - lo[..., None]) / d.clamp_min(1e-30)[..., None]).round(), 0.0)
    q = q.clamp(0, 15).to(torch.uint8).reshape(out, cols)
    return q[:, 0::2] | (q[:, 1::2] << 4), d, lo


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """fp32 (out, in) from :func:`quantize_groups`'s codes, scales and minimums."""
    q = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1).float()
    group = q.shape[1] // scales.shape[1]
    q = q.reshape(q.shape[0], scales.shape[1], group)
    return (q * scales[..., None] + mins[..., None]).reshape(codes.shape[0], -1)


class _Int4Matmul(torch.autograd.Function):
    """x Wᵀ with W dequantized in the forward and again in the backward (nothing of W is saved)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize().to(x.dtype).t()

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.layer.dequantize().to(g.dtype), None


class Int4Linear(torch.nn.Module):
    """Frozen linear stored as group-wise asymmetric INT4 (module docstring); computes in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, group: int, bias: bool = False,
                 device=None, dtype=torch.float32):
        super().__init__()
        if in_features % group or group % 2:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group}")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, in_features // group, device=device))
        self.register_buffer("mins", torch.zeros(out_features, in_features // group, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                       requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group: int) -> "Int4Linear":
        w = linear.weight
        new = cls(w.shape[1], w.shape[0], group, linear.bias is not None, w.device, w.dtype)
        new.codes, new.scales, new.mins = quantize_groups(w, group)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (fp32), for code that inspects ``.weight`` (shape, device, dtype)."""
        return self.dequantize()

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.codes, self.scales, self.mins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int4Matmul.apply(x, self)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}"


def quantize_model(model: torch.nn.Module, group: int, keep: tuple[str, ...] = ()) -> int:
    """Swap every ``nn.Linear`` of ``model`` but the output embedding and ``keep`` (a task's head) for an
    :class:`Int4Linear` (instance-level, in its parent). Returns the number swapped."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or module is head or name.rsplit(".", 1)[-1] in keep:
            continue
        if module.in_features % group:
            raise ValueError(f"{name}: {module.in_features} input features are not a multiple of group size {group}")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Int4Linear.from_linear(module, group))
        swapped += 1
    return swapped


@functools.cache
def lora_layer_class():
    """peft's LoRA layer for :class:`Int4Linear` bases (registered with ``LoraConfig._register_custom_module``)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.variants import QALoraLinearVariant

    class Int4LoraLinear(torch.nn.Module, LoraLayer):
        """LoRA (pooled, with ``use_qalora``) over an :class:`Int4Linear`; peft's variant does the math."""

        def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if config.use_dora:
                raise ValueError("DoRA over a QA-LoRA base is not supported")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def resolve_lora_variant(self, *, config, **kwargs):
            return QALoraLinearVariant() if config.use_qalora else None

        def forward(self, x, *args, **kwargs):
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            dtype = result.dtype  # fp32 adapters must not widen a bf16 model's activations (peft casts back too)
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                xa = x.to(a.weight.dtype)
                if name in self.lora_variant:
                    result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result)
                else:
                    result = result + b(a(self.lora_dropout[name](xa))) * self.scaling[name]
            return result.to(dtype)

    return Int4LoraLinear


def register(lora_config) -> None:
    """Let peft wrap :class:`Int4Linear` layers under ``lora_config``."""
    lora_config._register_custom_module({Int4Linear: lora_layer_class()})


def pooled_delta(layer, adapter: str) -> torch.Tensor:
    """The per-group update s · (BA) · (in/L) / L, fp32 (out, in/L), of a QA-LoRA layer (module docstring)."""
    a = layer.lora_A[adapter].weight.float()
    b = layer.lora_B[adapter].weight.float()
    groups = a.shape[1]
    return layer.scaling[adapter] * (b @ a) * groups / layer.qalora_group_size[adapter]


def full_delta(layer, adapter: str) -> torch.Tensor:
    """The same update as a full (out, in) fp32 weight: each group's value repeated over its columns."""
    return pooled_delta(layer, adapter).repeat_interleave(layer.qalora_group_size[adapter], dim=1)


def is_qalora(layer, adapter: str) -> bool:
    return adapter in getattr(layer, "qalora_group_size", {})



def folded_mins(layer) -> torch.Tensor:
    """The minimums m + Σ pooled updates of a LoRA layer over an :class:`Int4Linear` (fp32, (out, in/L)):
    with them the plain 4-bit layer computes what the adapted one does. Every active adapter must be
    QA-LoRA's with the base's group size (a plain LoRA update varies inside a group and cannot fold)."""
    from .errors import QfineError

    base = layer.get_base_layer()
    mins = base.mins.float().clone()
    active = [layer.active_adapters] if isinstance(layer.active_adapters, str) else layer.active_adapters
    for name in (a for a in active if a in layer.lora_A):
        if not is_qalora(layer, name) or layer.qalora_group_size[name] != base.group:
            raise QfineError(f"adapter {name!r} is not QA-LoRA with group size {base.group}: its update cannot be "
                             f"folded into the 4-bit zero points (merge to 16-bit with --dtype instead)")
        mins += pooled_delta(layer, name).to(mins.device)
    return mins
