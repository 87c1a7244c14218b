"""LoRA injection through peft, and loading saved PEFT-format adapters.

Saved adapters are plain peft artifacts (``adapter_config.json`` + ``adapter_model.safetensors``)
whose ``base_model_name_or_path`` names the folder or hub id the base was loaded from.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from qfine import config as C
from qfine.config import LoraSettings
from qfine.methods.merge_rule import merged_weight
from qfine.methods.qalora import register
from qfine.quant import KINDS
from qfine.quant.int4 import Int4Linear
from qfine.util.errors import QfineError
from qfine.util.integrity import check_folder

_BIASES = C.allowed(C.LoraSettings, "bias")
VARIANTS = C.allowed(C.LoraSettings, "variant")
METHODS = C.allowed(C.LoraSettings, "method")
INITS = C.allowed(C.LoraSettings, "init")


def _adaptable(module: torch.nn.Module) -> bool:
    """Layers peft's LoRA can wrap: a base linear of any kind qfine stores (:data:`qfine.quant.KINDS`),
    nn.Embedding, transformers' Conv1D (GPT-2 style), nn.Conv1d/2d/3d, and a layer peft already wraps
    (another adapter goes beside the first)."""
    return KINDS.is_base_linear(module) or isinstance(
        module, (torch.nn.Embedding, Conv1D, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, BaseTunerLayer))


def _model_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``named_modules`` without the insides of peft's wrapped layers (base_layer, lora_A.<name>, ...)."""
    out, inside = {}, []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        out[name] = m
        if isinstance(m, BaseTunerLayer):
            inside.append(name + ".")
    return out


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Sorted distinct short names (last path component) of the model's linear layers (a layer peft
    already wraps counts as the linear it wraps)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in _model_modules(model).items()
                   if name and (KINDS.is_base_linear(m) or isinstance(m, BaseTunerLayer))})


def _output_layer_names(model: torch.nn.Module) -> set[str]:
    """Short names of the output embedding (lm_head, score, ...), which all-linear leaves out as peft does."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if head is not None and m is head}


def resolve_targets(model: torch.nn.Module, targets: list[str]) -> str | list[str]:
    """The ``target_modules`` to give peft for ``targets``; raise QfineError for names it cannot adapt.

    ``all-linear`` alone is passed through (peft's rule: every linear but the output layer);
    ``all-linear`` with more names (``all-linear,lm_head``) becomes the model's linear names (output
    layer excluded) plus those names. Each other name must match a module by its full path or its
    last component, and every module it matches must be a layer LoRA can wrap (:func:`_adaptable`).
    """
    if not targets:
        raise QfineError("lora.target_modules is empty; name the modules to adapt (e.g. q_proj,v_proj) or all-linear")
    if targets == ["all-linear"] and int4_group(model) is None:
        return "all-linear"  # peft's own rule; it does not know INT4 layers, for which the names are listed below
    names = list(targets)
    if "all-linear" in names:
        names.remove("all-linear")
        heads = _output_layer_names(model)
        names = [n for n in linear_module_names(model) if n not in heads] + [n for n in names if n]
    modules = _model_modules(model)
    linear = ", ".join(linear_module_names(model))
    unknown = []
    for t in dict.fromkeys(names):
        matched = [(n, m) for n, m in modules.items() if n and (n == t or n.endswith("." + t))]
        if not matched:
            unknown.append(t)
            continue
        wrong = [(n, m) for n, m in matched if not _adaptable(m)]
        if wrong:
            n, m = wrong[0]
            raise QfineError(f"lora.target_modules: {t!r} names {type(m).__name__} modules (e.g. {n}), which LoRA "
                             f"cannot wrap; name linear layers instead: {linear} (or all-linear)")
    if unknown:
        raise QfineError(f"unknown LoRA target module(s) {', '.join(unknown)}; this model's linear modules are: "
                         f"{linear} (or use all-linear)")
    return list(dict.fromkeys(names))


TRAINABLE = ("embed", "norm", "head")


def trainable_modules(model: torch.nn.Module, parts: list[str]) -> list[str]:
    """Module names (last path components, as peft's modules_to_save takes them) of ``parts``: embed,
    norm (every module whose class name ends in Norm) and head."""
    unknown = [p for p in parts if p not in TRAINABLE]
    if unknown:
        raise QfineError(f"lora.trainable: unknown part(s) {', '.join(unknown)}; choose from {', '.join(TRAINABLE)}")
    names = []
    modules = dict(model.named_modules())
    for part in parts:
        if part == "norm":
            found = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if n and type(m).__name__.endswith("Norm")})
        else:
            get = getattr(model, "get_input_embeddings" if part == "embed" else "get_output_embeddings", None)
            target = get() if callable(get) else None
            found = [n.rsplit(".", 1)[-1] for n, m in modules.items() if n and m is target][:1]
        if not found:
            raise QfineError(f"lora.trainable: this model has no {part} module")
        names += found
    return names


def check_lora_settings(cfg: LoraSettings) -> None:
    """Reject LoRA settings peft would accept and then fail on (or silently misuse) later."""
    if not isinstance(cfg.r, int) or cfg.r < 1:
        raise QfineError(f"lora.r must be a whole number of at least 1, not {cfg.r!r}")
    if not cfg.alpha > 0:
        raise QfineError(f"lora.alpha must be greater than 0, not {cfg.alpha!r}")
    if not 0 <= cfg.dropout < 1:
        raise QfineError(f"lora.dropout must be in [0, 1), not {cfg.dropout!r}")
    if cfg.bias not in _BIASES:
        raise QfineError(f"lora.bias must be one of {', '.join(_BIASES)}, not {cfg.bias!r}")
    if cfg.method not in METHODS:
        raise QfineError(f"lora.method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    if cfg.method == "qa-lora" and (cfg.variant != "lora" or cfg.init != "default"):
        raise QfineError("lora.method qa-lora takes lora.variant lora and lora.init default (its A sees pooled "
                         "inputs, which DoRA, LoftQ and PiSSA do not model)")
    if cfg.variant not in VARIANTS:
        raise QfineError(f"lora.variant must be one of {', '.join(VARIANTS)}, not {cfg.variant!r}")
    if cfg.init not in INITS:
        raise QfineError(f"lora.init must be one of {', '.join(INITS)}, not {cfg.init!r}")


def check_init_for_base(cfg: LoraSettings, quantization: str) -> None:
    """LoftQ corrects a 4-bit quantization error; PiSSA rewrites the frozen base weights, which a
    quantized base cannot take without requantizing (and the saved adapter would then no longer fit
    the base it is loaded onto)."""
    four_bit = quantization in ("nf4", "fp4")
    if cfg.init == "loftq" and not four_bit:
        raise QfineError(f"lora.init loftq corrects a 4-bit base's quantization error; this base is "
                         f"model.quantization {quantization} (use nf4 or fp4, or another lora.init)")
    if cfg.init == "pissa" and quantization != "none":
        raise QfineError(f"lora.init pissa moves the top singular directions out of the frozen base weights, which "
                         f"a {quantization} base cannot take without requantizing; use model.quantization none, or "
                         f"lora.init loftq for a 4-bit base")


def int4_group(model: torch.nn.Module) -> int | None:
    """The group size of the model's INT4 (QA-LoRA) layers, or None when it has none."""
    return next((m.group for m in model.modules() if isinstance(m, Int4Linear)), None)


def lora_config(cfg: LoraSettings, targets, task_type: str, modules_to_save: bool = True, group: int | None = None):
    """The peft ``LoraConfig`` for qfine's LoRA settings (LoftQ is applied after injection, see
    :func:`qfine.methods.loftq.loftq_init`, so peft sees the default initialisation for it). ``group``: the
    base's INT4 group size, whose layers peft then wraps with qfine's layer class."""
    if cfg.method == "qa-lora" and group is None:
        raise QfineError("lora.method qa-lora needs an int4 base (model.quantization int4)")
    init = {"default": True, "loftq": True}.get(cfg.init, cfg.init)
    qa = {"use_qalora": True, "qalora_group_size": group} if cfg.method == "qa-lora" else {}
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      bias=cfg.bias, modules_to_save=(list(cfg.modules_to_save) or None) if modules_to_save else None,
                      use_dora=cfg.variant == "dora", use_rslora=cfg.rslora, init_lora_weights=init,
                      task_type=task_type, **qa)
    if group is not None:
        register(lcfg)
    return lcfg


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run the block with torch's RNGs (CPU and every CUDA device) seeded with ``seed``, then put the
    caller's RNG state back, so what is drawn inside depends on ``seed`` alone. ``None``: unchanged."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


REFERENCE = "reference"  # the frozen adapter a preference run started from, used as its reference model


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder of a run directory (RUN/adapter) or an adapter folder itself."""
    folder = Path(path)
    if (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise QfineError(f"train.init_adapter {path}: no adapter_config.json there or in its adapter/ folder")
    return folder


def start_from(model, path: str | Path, reference: bool) -> str:
    """Load the adapter at ``path`` into the model's trainable adapter ("default"), which must have the
    same rank, alpha and target modules; with ``reference`` also as the frozen adapter :data:`REFERENCE`.
    Returns the line to print."""
    import json

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = adapter_folder(path)
    check_folder(folder)
    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    ours = model.peft_config["default"]
    differ = [f"{key} {saved.get(key)!r} vs this run's {getattr(ours, key)!r}" for key in ("r", "lora_alpha")
              if saved.get(key) != getattr(ours, key)]
    if set(saved.get("target_modules") or ()) != set(ours.target_modules or ()):
        differ.append(f"target_modules {sorted(saved.get('target_modules') or ())} vs this run's "
                      f"{sorted(ours.target_modules or ())}")
    if differ:
        raise QfineError(f"train.init_adapter {folder}: its LoRA settings differ ({'; '.join(differ)}); "
                         "train with the same lora settings")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k and ".default." in k]
    if missing:
        raise QfineError(f"train.init_adapter {folder}: {len(missing)} LoRA weights of this run are not in it "
                         f"(first: {missing[0]})")
    if reference:
        model.load_adapter(str(folder), adapter_name=REFERENCE, is_trainable=False)
        model.set_adapter("default")
    return f"adapter: starts from {folder}" + ("; that adapter, frozen, is the reference" if reference else "")


@contextlib.contextmanager
def reference_model(model) -> Iterator[None]:
    """No-grad block computing with the reference: the frozen :data:`REFERENCE` adapter when the run
    started from one, else the base with every adapter switched off. The trainable adapter is active again after."""
    with torch.no_grad():
        if REFERENCE not in model.peft_config:
            with model.disable_adapter():
                yield
            return
        active = model.active_adapter
        model.set_adapter(REFERENCE, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter(active)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing (non-reentrant) with the input embeddings' output marked as requiring
    grad, so checkpointed blocks, whose inputs would otherwise not require grad, still back-propagate
    into the adapters. Works before or after peft wraps the model. (On the fast path the fused layers
    then get qfine's reentrant-style recompute instead: qfine.fast.offload.)"""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def add_lora(model: torch.nn.Module, cfg: LoraSettings, gradient_checkpointing: bool = False,
             adapter_name: str = "default", seed: int | None = None, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with trainable LoRA adapters per ``cfg``; returns the ``PeftModel``.

    The base stays frozen. With ``seed`` the adapters' random initialisation (A, Kaiming-uniform) is
    drawn from torch's RNG seeded with it, so the same seed gives the same starting adapter however
    many models were built before in the process (``qfine train`` passes ``train.seed``). With
    gradient checkpointing, input embeddings are marked as requiring grad so that checkpointed
    blocks (whose inputs would otherwise not require grad) still back-propagate into the adapters.
    """
    check_lora_settings(cfg)
    targets = resolve_targets(model, cfg.target_modules)
    extra = trainable_modules(model, cfg.trainable)
    if extra:
        cfg = dataclasses.replace(cfg, modules_to_save=list(dict.fromkeys([*cfg.modules_to_save, *extra])))
    for name in cfg.modules_to_save:
        if not any(n == name or n.endswith("." + name) for n, _ in model.named_modules()):
            raise QfineError(f"lora.modules_to_save: no module named {name!r} in this model")
    lcfg = lora_config(cfg, targets, task_type, group=int4_group(model))
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
    with seeded(seed):
        return get_peft_model(model, lcfg, adapter_name=adapter_name)


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, adapter_name: str = "default",
                 is_trainable: bool = False):
    """Attach a saved PEFT adapter to ``model`` (a fresh base); returns the ``PeftModel``."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QfineError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)")
    config = None
    if int4_group(model) is not None:  # peft wraps INT4 layers only with qfine's layer class registered
        config = LoraConfig.from_pretrained(str(adapter_dir))
        register(config)
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config)


# --- several adapters on one base -------------------------------------------------------------

def add_adapter(model, name: str, cfg: LoraSettings, seed: int | None = None) -> None:
    """Add a new, freshly initialised LoRA adapter ``name`` to a ``PeftModel`` (not activated);
    ``seed`` as in :func:`add_lora`."""
    check_lora_settings(cfg)
    targets = resolve_targets(model.get_base_model(), cfg.target_modules)
    with seeded(seed):
        model.add_adapter(name, lora_config(cfg, targets, next(iter(model.peft_config.values())).task_type,
                                            modules_to_save=False, group=int4_group(model)))


def set_active(model, name: str | list[str]) -> None:
    """Make ``name`` (or several names, whose updates then add up) the active adapter(s)."""
    names = [name] if isinstance(name, str) else list(name)
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise QfineError(f"no adapter named {', '.join(missing)}; loaded: {', '.join(model.peft_config)}")
    if len(names) == 1:
        model.set_adapter(names[0])
    else:
        model.base_model.set_adapter(names)


def combine_adapters(model, names: list[str], weights: list[float], new_name: str,
                     combination: str = "cat", svd_rank: int | None = None) -> None:
    """Add adapter ``new_name`` = weighted combination of ``names`` (peft's add_weighted_adapter).

    ``cat`` concatenates the low-rank factors, so its update is exactly ``sum_i w_i · ΔW_i``;
    ``linear`` mixes A and B separately (exact only when a single weight is non-zero); ``svd``
    truncates the exact sum to ``svd_rank``.
    """
    if combination not in ("cat", "linear", "svd"):
        raise QfineError(f"combination must be cat, linear or svd, not {combination!r}")
    if len(names) != len(weights):
        raise QfineError("give one weight per adapter")
    kw = {"svd_rank": svd_rank} if combination == "svd" else {}
    model.add_weighted_adapter(list(names), list(weights), new_name, combination_type=combination, **kw)


def _lora_layers(model):
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


@dataclass
class MergedLayers:
    """What :func:`merge_adapter` swapped out: ``(parent module, attribute, peft LoRA layer)`` per layer."""

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.swapped)


def merge_adapter(model, dtype: torch.dtype | None = None) -> MergedLayers:
    """Merge the active adapter(s) into a 16-bit/fp32 copy of every adapted layer, in place.

    Each peft LoRA layer is swapped (instance-level, in its parent) for a plain ``nn.Linear``
    holding ``cast(dequant(W).float() + ΔW)`` (:func:`qfine.methods.merge_rule.merged_weight`); the
    returned record keeps the LoRA layers, so that :func:`unmerge_adapter` restores them exactly. A 4-bit
    base is never requantized. ``dtype`` defaults to each layer's compute dtype. :func:`merged` does
    merge → use → unmerge as a ``with`` block.
    """
    layers = list(_lora_layers(model))
    if not layers:
        raise QfineError("no LoRA layer to merge (the adapters are merged already, or none was added)")
    record = MergedLayers()
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    # int8 / INT4 bases carry no compute dtype: their layers compute in the model's activation dtype
    fallback = getattr(getattr(embed, "weight", None), "dtype", torch.float32)
    for name, layer in layers:
        base = layer.get_base_layer()
        w = merged_weight(layer, KINDS.dequantize(base))
        out_dtype = dtype or getattr(base, "compute_dtype", None)
        if out_dtype is None and type(base) is torch.nn.Linear:
            out_dtype = base.weight.dtype
        if out_dtype is None or not out_dtype.is_floating_point:
            out_dtype = fallback if fallback.is_floating_point else torch.float32
        plain = torch.nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, device=w.device, dtype=out_dtype)
        with torch.no_grad():
            plain.weight.copy_(w)
            if base.bias is not None:
                plain.bias.copy_(base.bias)
        plain.requires_grad_(False)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, plain)
        record.swapped.append((parent, attr, layer))
    return record


def unmerge_adapter(model, record: MergedLayers) -> int:
    """Undo :func:`merge_adapter`: put the LoRA layers (and their 4-bit weights) back; returns how many."""
    for parent, attr, layer in record.swapped:
        setattr(parent, attr, layer)
    n = len(record.swapped)
    record.swapped.clear()
    return n


@contextlib.contextmanager
def merged(model, dtype: torch.dtype | None = None) -> Iterator[MergedLayers]:
    """``with merged(model): …`` runs the block on the exactly merged model and restores the adapters
    after it, also when the block raises."""
    record = merge_adapter(model, dtype)
    try:
        yield record
    finally:
        unmerge_adapter(model, record)


def unload(model):
    """The base model with every LoRA layer removed (adapters discarded, nothing merged)."""
    return model.unload()


def delete_adapter(model, name: str) -> None:
    """Remove adapter ``name`` and its weights."""
    if name not in model.peft_config:
        raise QfineError(f"no adapter named {name}; loaded: {', '.join(model.peft_config)}")
    model.delete_adapter(name)
