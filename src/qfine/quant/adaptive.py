"""Adaptive 4/8-bit quantization: int8 where a layer is sensitive to 4-bit, NF4 elsewhere, within a
memory budget.

Sensitivity of a linear layer, measured on real activations X (the layer's inputs while the 16-bit
model reads calibration sequences, by default the run's own first training rows)::

    err(layer) = ‖X (W − Ŵ)ᵀ‖ / ‖X Wᵀ‖        Ŵ = dequant(NF4(W)), as bitsandbytes stores it

That error says how much a layer's output moves, not what it costs the model. The choice uses the
loss increase each layer alone would cause, to second order with the empirical Fisher of the loss
L (summed over tokens) with respect to the layer's outputs Y, g_t = ∂L/∂Y_t for token t::

    ΔL(layer, Ŵ) ≈ ½ Σ_t (g_t · X_t (Ŵ − W)ᵀ)²

One forward and backward over the calibration rows gives every layer's g and X. Layers are taken in
order of decreasing benefit per byte, (ΔL(NF4) − ΔL(int8)) / extra bytes, and kept in int8 while
the extra bytes fit the budget. int8 costs about 1 byte per weight against NF4's 0.52
(:mod:`qfine.quant.int8`, :mod:`qfine.quant.bnb4`). A big MLP layer must therefore save three times what a small
attention layer saves.
The choice is written into the run's config (``model.int8_modules``), so every later load (generate,
eval, merge, export, resume) rebuilds the same mixed model without measuring again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import bitsandbytes.functional as F
import torch

from qfine.quant import bnb4, int8
from qfine.util.errors import QfineError


@dataclass
class LayerSensitivity:
    name: str
    params: int
    err_nf4: float
    err_int8: float
    int8: bool = False
    loss_nf4: float | None = None   # estimated loss increase (Fisher, module docstring) under NF4
    loss_int8: float | None = None  # … and under int8


def extra_int8_bytes(params: int, rows: int) -> float:
    """Bytes an int8 layer takes beyond its NF4 form: 1 byte per weight + an fp32 scale per row."""
    return int8.extra_bytes_over_nf4(params, rows, bnb4.bytes_per_weight())


def _nf4(w: torch.Tensor) -> torch.Tensor:
    q, state = F.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4")
    return F.dequantize_4bit(q, state).float()


def _int8(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return (w / scale).round().clamp(-127, 127) * scale


@torch.no_grad()
def measure(model: torch.nn.Module, batches: list[torch.Tensor], names: list[str],
            max_tokens: int = 4096) -> list[LayerSensitivity]:
    """Each named linear's output error under NF4 (and int8) on the inputs it sees during ``batches``."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]
    try:
        for ids in batches:
            model(input_ids=ids.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    out = []
    for n in names:
        x = torch.cat(inputs.pop(n))[:max_tokens].float()
        w = modules[n].weight.float()
        ref = (x @ w.t()).norm()
        out.append(LayerSensitivity(n, w.numel(), float((x @ (w - _nf4(w)).t()).norm() / ref),
                                    float((x @ (w - _int8(w)).t()).norm() / ref)))
    return out


def loss_sensitivity(model: torch.nn.Module, batches: list[torch.Tensor], layers: list[LayerSensitivity]) -> None:
    """Fill each layer's ``loss_nf4`` / ``loss_int8``: ½ Σ_t (g_t · X_t ΔWᵀ)² over ``batches`` (token ids,
    labels = inputs), one forward and backward per batch; the model's weights are not changed."""
    modules = dict(model.named_modules())
    delta = {}
    for s in layers:
        w = modules[s.name].weight.detach().float()
        delta[s.name] = (_nf4(w) - w, _int8(w) - w)
    acc = {s.name: [0.0, 0.0] for s in layers}
    seen: dict[str, torch.Tensor] = {}

    def keep_input(m, args, name):
        seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

    def score(m, grad_in, grad_out, name):
        g = grad_out[0].reshape(-1, grad_out[0].shape[-1]).float()
        x = seen.pop(name)
        for i, d in enumerate(delta[name]):
            acc[name][i] += 0.5 * float(((x @ d.t()) * g).sum(dim=1).square().sum())

    hooks = []
    for s in layers:
        hooks.append(modules[s.name].register_forward_pre_hook(lambda m, a, n=s.name: keep_input(m, a, n)))
        hooks.append(modules[s.name].register_full_backward_hook(lambda m, gi, go, n=s.name: score(m, gi, go, n)))
    embed = model.get_input_embeddings()
    hooks.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        with torch.enable_grad():
            for ids in batches:
                ids = ids.to(model.device)
                out = model(input_ids=ids, labels=ids)
                (out.loss * (ids.shape[1] - 1)).backward()  # the summed loss: per-token gradients
    finally:
        for h in hooks:
            h.remove()
    for s in layers:
        s.loss_nf4, s.loss_int8 = acc[s.name]


def budget_bytes(spec: str, all_nf4: int) -> int:
    """'1.15x' (a ratio to the all-NF4 model) or '2.5GiB' → the total weight bytes allowed."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(x|gib|gb)\s*", str(spec).lower())
    if not m:
        raise QfineError(f"model.memory_budget {spec!r}: give a ratio to all-NF4 such as 1.15x, or a size such as 2.5GiB")
    value = float(m.group(1))
    total = int(value * all_nf4) if m.group(2) == "x" else int(value * 2**30)
    if total < all_nf4:
        raise QfineError(f"model.memory_budget {spec} is below the all-NF4 model's {all_nf4 / 2**30:.3f} GiB")
    return total


def choose(layers: list[LayerSensitivity], rows: dict[str, int], spare: float) -> list[LayerSensitivity]:
    """Mark layers int8, best first, while their extra bytes fit ``spare``; returns ``layers``. Best: the
    largest estimated loss saved per extra byte when :func:`loss_sensitivity` ran, else the largest
    NF4 output error."""
    def benefit(s):
        if s.loss_nf4 is None:
            return s.err_nf4
        return (s.loss_nf4 - s.loss_int8) / extra_int8_bytes(s.params, rows[s.name])

    for s in sorted(layers, key=lambda s: -benefit(s)):
        cost = extra_int8_bytes(s.params, rows[s.name])
        if cost <= spare:
            s.int8, spare = True, spare - cost
    return layers


def to_int8(model: torch.nn.Module, names: list[str], read) -> None:
    """Swap each named (4-bit) linear of a loaded model for a bitsandbytes int8 linear quantized from the
    checkpoint's own 16-bit weight (``read(key)``, :func:`qfine.models.weights.pristine_reader`), not from
    the 4-bit one; instance swap in its parent, state-dict keys unchanged."""
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise QfineError(f"model.int8_modules: no module {name!r} in this model") from None
        if not isinstance(lin, torch.nn.Linear):
            raise QfineError(f"model.int8_modules: {name} is a {type(lin).__name__}, not a linear layer")
        device = lin.weight.device
        w = read(f"{name}.weight").to(torch.float16 if device.type == "cuda" else torch.float32)
        new = int8.from_weight(w, lin.bias, device)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


def decoder_linears(model: torch.nn.Module) -> list[str]:
    """Full names of the linears NF4 would quantize (all but the output embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]
