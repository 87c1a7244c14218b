"""Loading a model source (:mod:`qfine.models.sources`): quantization on load, device placement and the CPU guard.

Quantization happens on load through bitsandbytes (nf4/fp4 with optional double quantization,
int8) or not at all (``none``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

from qfine.config import ModelConfig
from qfine.models.heads import auto_class, head_of
from qfine.models.sources import hub_error, resolve_source
from qfine.models.weights import pristine_reader
from qfine.quant.adaptive import to_int8
from qfine.quant.bnb4 import guard_cpu_repack
from qfine.quant.int4 import QUANT_METHOD, quantize_model
from qfine.util.distributed import cuda_device
from qfine.util.errors import QfineError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise QfineError(f"model.device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise QfineError("model.device is cuda but no CUDA GPU is visible")
    return device


def resolve_compute_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` → bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise QfineError(f"dtype must be auto, bf16, fp16 or fp32, not {name!r}")
    return _DTYPES[name]


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype, keep: tuple[str, ...] = ()):
    """The bitsandbytes config for ``cfg.quantization``, or None for ``none``. ``keep``: module names
    left unquantized (a task's head); empty keeps transformers' default (the output embedding)."""
    q = cfg.quantization
    skip = {"llm_int8_skip_modules": list(keep)} if keep else {}
    if q in ("nf4", "fp4", "adaptive"):  # adaptive: NF4, then the chosen layers swapped for int8
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4" if q == "adaptive" else q,
                                  bnb_4bit_use_double_quant=cfg.double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype, **skip)
    if q == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    if q in ("none", "int4"):  # int4 is applied after loading (qfine.quant.int4.quantize_model)
        return None
    raise QfineError(f"model.quantization must be nf4, fp4, int8, int4, adaptive or none, not {q!r}")


@dataclass
class Loaded:
    """A loaded base model with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str  # local folder or hub id that from_pretrained read
    device: str
    compute_dtype: torch.dtype
    # the data settings of the run the adapter was trained in (system prompt, template, format,
    # columns, loss_on), so that serving and scoring see prompts as training did; None for a bare model
    data: object = None
    task: str = "causal-lm"
    labels: list | None = None  # seq-cls: class names in label-id order
    generation: object = None  # the run's GenerationSettings, when loaded from a run


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token (EOS when the model defines none)."""
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig | str = "default", labels: list[str] | None = None, stage_on_cpu: bool = False,
               tokenizer=None, **overrides) -> Loaded:
    """Load the model of ``cfg.task`` (a causal LM by default), quantized per ``cfg``, on the resolved device.

    ``cfg`` may be a :class:`ModelConfig` or just a source string; keyword ``overrides`` replace
    ModelConfig fields in a copy (``load_model("default", quantization="fp4")``); ``cfg`` is never changed. ``labels``: the class names
    of a ``seq-cls`` model, in label-id order (its head gets one output per label and is kept out
    of quantization). ``stage_on_cpu``: a CUDA model whose weights go to the CPU for now (in the GPU's
    compute dtype): for weight streaming (:func:`qfine.fast.stream.install` places it afterwards), when the
    base is larger than the card. ``tokenizer``: the source's tokenizer when the caller loaded it already.
    """
    if isinstance(cfg, str):
        cfg = ModelConfig(source=cfg)
    cfg = dataclasses.replace(cfg, **overrides)
    spec = head_of(cfg.task)
    head: dict = {}
    if spec.labelled:
        if not labels or len(labels) < 2:
            raise QfineError("a seq-cls model needs at least two labels")
        head = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={name: i for i, name in enumerate(labels)})
    device = resolve_device(cfg.device)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    if device == "cuda":
        device = cuda_device()  # a launched job's rank loads onto its own GPU
    place = "cpu" if stage_on_cpu else device
    qconfig = quantization_config(cfg, compute_dtype, spec.heads)
    source = resolve_source(cfg.source)
    if prequantized(source):
        qconfig = None  # the checkpoint carries its own (e.g. a `qfine merge --requantize` output)
    try:
        tokenizer = tokenizer or load_tokenizer(source, cfg.trust_remote_code)
        # quantization_config=None must not be passed: transformers would drop a checkpoint's own
        quant = {"quantization_config": qconfig} if qconfig is not None else {}
        # no attn_implementation: transformers picks SDPA where the architecture supports it and eager
        # attention otherwise (asking for "sdpa" outright fails to load e.g. Gemma 2)
        if _int4_folder(source):
            model = _load_int4_folder(source, cfg, compute_dtype, place, spec.heads, head)
        else:
            model = auto_class(cfg.task).from_pretrained(
                source, dtype=compute_dtype, device_map={"": place}, trust_remote_code=cfg.trust_remote_code,
                **quant, **head)
            if cfg.quantization == "int4":
                _quantize_int4(model, cfg.group_size, spec.heads)
            if cfg.quantization == "adaptive" and cfg.int8_modules:
                to_int8(model, cfg.int8_modules, pristine_reader(source, need="model.quantization adaptive"))
    except OSError as e:
        if Path(source).is_dir():
            raise QfineError(f"cannot load model from {source}: {e}") from None
        raise hub_error(cfg.source, e) from None
    except ValueError as e:  # e.g. a decoder-only model asked for as seq2seq
        if "Unrecognized configuration class" in str(e):
            raise QfineError(f"{cfg.source} cannot be loaded for model.task {cfg.task}: "
                             f"{str(e).splitlines()[0]}") from None
        raise
    guard_cpu_repack(model)
    if spec.labelled and model.config.pad_token_id is None:
        # the head pools the last non-pad token of each row: it must know which id pads
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)  # the base is frozen; LoRA adds what trains
    model.config.use_cache = False  # re-enabled for generation
    return Loaded(model, tokenizer, source, device, compute_dtype, task=cfg.task, labels=labels)


def _quantize_int4(model, group: int, heads: tuple[str, ...]) -> None:
    try:
        quantize_model(model, group, heads)
    except ValueError as e:
        raise QfineError(f"model.group_size {group}: {e}") from None


def _int4_folder(source: str) -> dict | None:
    """The quantization_config of a qfine INT4 folder (a QA-LoRA merge), or None."""
    cfg = Path(source) / "config.json"
    q = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") if cfg.is_file() else None
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def _load_int4_folder(source: str, cfg: ModelConfig, compute_dtype, device: str, heads, head: dict):
    """Build the architecture from config.json, swap its linears for INT4 ones of the saved group size,
    and read the codes, scales, minimums and the 16-bit rest from the folder's safetensors."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **head)
    group = int(config.quantization_config["group_size"])
    del config.quantization_config
    model = auto_class(cfg.task).from_config(config, dtype=compute_dtype, trust_remote_code=cfg.trust_remote_code)
    _quantize_int4(model, group, heads)
    state = {}
    for f in sorted(Path(source).glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise QfineError(f"{source}: INT4 checkpoint does not fit its config (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.to(device).eval()


def prequantized(source: str) -> bool:
    """Whether a local model folder was saved already quantized (its config has quantization_config)."""
    cfg = Path(source) / "config.json"
    return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text(encoding="utf-8"))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical element number."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state"):  # Params4bit stores two 4-bit values per uint8 element
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def describe(model: torch.nn.Module) -> str:
    """One line: memory footprint (MiB) and trainable parameters."""
    trainable, total = count_parameters(model)
    mem = model.get_memory_footprint() / 2**20 if hasattr(model, "get_memory_footprint") else float("nan")
    return (f"memory footprint {mem:,.1f} MiB; trainable parameters {trainable:,} of {total:,} "
            f"({100 * trainable / max(total, 1):.3f}%)")
