"""Group-wise asymmetric INT4 (QA-LoRA's base, arXiv 2309.14717): :class:`Int4Linear`.

Storage of a frozen linear (out, in), groups of L input columns (g = j // L)::

    W[o, j] = d[o, g] · q[o, j] + m[o, g]        q ∈ {0..15}, d and m fp32       (GGUF Q4_1's x = d·q + m)

QA-LoRA's adapter (:mod:`qfine.methods.qalora`) merges into the minimums m, so a merged model stays
4-bit with its codes and scales byte-identical.
"""

from __future__ import annotations

import warnings

import torch

from qfine.quant.registry import BaseWeight, Settings

QUANT_METHOD = "qfine_int4"  # config.json quantization_config.quant_method of a 4-bit qfine folder
# peft warns about any base layer type it does not know, although qfine registers a LoRA layer for it
warnings.filterwarnings("ignore", message=r"Unsupported layer type '<class 'qfine\.quant\.int4\.Int4Linear'>'")


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




def stored_bytes(out: int, inp: int, s: Settings) -> float:
    """½ byte per weight + an fp32 scale and minimum per group."""
    return out * inp / 2 + 8 * out * inp / s.group_size


def streamed(linear: Int4Linear) -> list[tuple[object, str, torch.Tensor]]:
    return [(linear, name, getattr(linear, name)) for name in ("codes", "scales", "mins")]


KIND = BaseWeight(name="int4", config_names=("int4",), matches=lambda m: isinstance(m, Int4Linear),
                  dequantize=lambda m: m.dequantize(), stored_bytes=stored_bytes, streamed=streamed, fused=True)
