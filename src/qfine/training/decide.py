"""What ``qfine train`` decides for a run, returned as a record (:class:`Decisions`).

The caller's config is never changed: the run trains with ``decisions.applied(cfg)``, a copy whose
fields say how it really trained (QA-LoRA's int4 base, adaptive quantization's int8 layers, a
max_seq_len bounded by the model's context, weight streaming, checkpointing chosen to fit, a precision
the architecture can take), and that copy is what config.yaml and the report record.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from dataclasses import dataclass, field

import torch

from qfine import config as C
from qfine.data import build_datasets
from qfine.memory import estimate as memory
from qfine.memory import fit
from qfine.memory.plan import weight_bytes
from qfine.methods.lora import check_init_for_base
from qfine.models.loading import load_model, load_tokenizer
from qfine.models.sources import model_config, resolve_source
from qfine.objectives import multitask
from qfine.objectives.base import Objective
from qfine.quant.adaptive import (
    LayerSensitivity,
    budget_bytes,
    choose,
    decoder_linears,
    extra_int8_bytes,
    loss_sensitivity,
    measure,
)
from qfine.util import distributed
from qfine.util.errors import QfineError

CALIBRATION_ROWS = 16  # training rows adaptive quantization measures its layers on


@dataclass(frozen=True)
class Decisions:
    """The settings a run chose for itself; ``lines`` say what and why, in order."""

    quantization: str
    max_seq_len: int
    int8_modules: tuple[str, ...] = ()
    sensitivity: tuple[str, list[LayerSensitivity]] | None = None  # adaptive: (summary line, every layer)
    stream: fit.StreamChoice = fit.StreamChoice()
    gradient_checkpointing: bool = False
    offload_checkpoints: bool = False
    precision: str | None = None  # None: the config's
    lines: tuple[str, ...] = field(default=())

    def applied(self, cfg: C.RunConfig) -> C.RunConfig:
        """A copy of ``cfg`` with these decisions in it (``cfg`` itself is left as it is)."""
        model = dataclasses.replace(cfg.model, quantization=self.quantization, int8_modules=list(self.int8_modules))
        data = dataclasses.replace(cfg.data, max_seq_len=self.max_seq_len)
        train = dataclasses.replace(
            cfg.train, gradient_checkpointing=self.gradient_checkpointing,
            offload_checkpoints=self.offload_checkpoints, precision=self.precision or cfg.train.precision,
            stream_weights="on" if self.stream.stream else cfg.train.stream_weights)
        return dataclasses.replace(cfg, model=model, data=data, train=train)

    def said(self, line: str | None, **changes) -> "Decisions":
        """This record with ``changes`` and ``line`` (when given) appended to its lines."""
        return dataclasses.replace(self, lines=self.lines + ((line,) if line else ()), **changes)


def settle(cfg: C.RunConfig) -> Decisions:
    """What follows from the config alone, with nothing loaded: QA-LoRA's int4 base and data.max_seq_len
    bounded by the model's context. A resumed run is compared with its config.yaml after these."""
    d = Decisions(quantization=cfg.model.quantization, max_seq_len=cfg.data.max_seq_len,
                  int8_modules=tuple(cfg.model.int8_modules),
                  gradient_checkpointing=cfg.train.gradient_checkpointing,
                  offload_checkpoints=cfg.train.offload_checkpoints)
    if cfg.lora.method == "qa-lora":
        if cfg.model.quantization == "nf4":  # the default: QA-LoRA brings its own base
            d = d.said(f"qa-lora: base quantized to int4, groups of {cfg.model.group_size} input columns",
                       quantization="int4")
        elif cfg.model.quantization != "int4":
            raise QfineError(f"lora.method qa-lora trains over an int4 base, not model.quantization "
                             f"{cfg.model.quantization}")
    check_init_for_base(cfg.lora, d.quantization)
    line, changes = _context(cfg)
    return d.said(line, **changes)


def decide(cfg: C.RunConfig, d: Decisions, objective: Objective, device: str, resume: bool) -> Decisions:
    """The rest of what the run decides before its weights load, after :func:`settle`'s ``d``: adaptive
    quantization's int8 layers (measured on the first training rows), multi-task limits, and weight
    streaming. Raises QfineError for settings that cannot work together."""
    if d.quantization == "adaptive" and not d.int8_modules:
        if not objective.supports.adaptive:
            raise QfineError(f"model.quantization adaptive serves causal LMs for now, not model.task {cfg.model.task}")
        names, layers, line = _int8_layers(d.applied(cfg))
        d = d.said(line, int8_modules=tuple(names), sensitivity=(line, layers))
    if cfg.data.task_column:
        if not objective.supports.multitask:
            raise QfineError(f"data.task_column: multi-task adapters serve causal-lm runs, not model.task "
                             f"{cfg.model.task}")
        multitask.check_config(cfg, resume)
    stream = streaming(d.applied(cfg), objective, device)
    d = d.said(stream.line, stream=stream)
    if stream.stream:
        d = dataclasses.replace(d, gradient_checkpointing=True)
    return d


def _context(cfg: C.RunConfig) -> tuple[str | None, dict]:
    """(line, changes): data.max_seq_len bounded by the model's context (max_position_embeddings in its
    config.json), since positions past it were never trained. A length the user set is refused; the
    default (512) is lowered to the context."""
    try:
        config = model_config(cfg.model.source)
    except QfineError:
        return None, {}  # load_model names what is wrong with the source
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or cfg.data.max_seq_len <= limit:
        return None, {}
    if cfg.data.max_seq_len == C.DataConfig().max_seq_len:
        return (f"data.max_seq_len lowered from the default 512 to the model's context of {limit} tokens",
                {"max_seq_len": limit})
    raise QfineError(f"data.max_seq_len {cfg.data.max_seq_len} is longer than the model's context of {limit:,} "
                     f"tokens (max_position_embeddings in {cfg.model.source}'s config.json); lower --max-seq-len")


def streaming(cfg: C.RunConfig, objective: Objective, device: str) -> fit.StreamChoice:
    """``train.stream_weights`` decided before the model is loaded (a streamed base is loaded on the CPU
    first): refused where it cannot run, ``on`` streams every layer, ``auto`` asks
    :func:`qfine.memory.fit.auto_streaming`."""
    t = cfg.train
    if t.stream_weights == "off":
        return fit.StreamChoice()
    refusal = None
    if device != "cuda":
        refusal = f"nothing to stream from on {device}"
    elif cfg.model.quantization not in ("nf4", "fp4"):
        refusal = f"it serves 4-bit bases (model.quantization nf4 or fp4), not {cfg.model.quantization}"
    elif not t.fast_path or not objective.supports.fast_path:
        refusal = "it runs inside the fast path's fused layers (causal LMs, train.fast_path on)"
    elif distributed.world_size() > 1:
        refusal = "it has not been tested under several ranks"
    if refusal:
        if t.stream_weights == "on":
            if device != "cuda":
                return fit.StreamChoice(line=f"stream_weights: {refusal}; the weights stay where they are")
            raise QfineError(f"train.stream_weights on: {refusal}")
        return fit.StreamChoice()
    if t.stream_weights == "on":
        try:
            host = fit.streamed_host_bytes(model_config(cfg.model.source), cfg)
        except Exception:  # noqa: BLE001 - only a check: the load itself reports an unreadable model
            host = 0
        if (short := fit.host_shortfall(host, "streamed weights")) is not None:
            raise QfineError(f"train.stream_weights on: {short}")
        return fit.StreamChoice(True, 0, "weight streaming on (train.stream_weights)")
    if t.resident_weights_gib > 0:
        return fit.StreamChoice()
    try:
        config = model_config(cfg.model.source)
        memory.Shapes.from_config(config)
    except Exception:  # noqa: BLE001 - the estimate is optional: without a readable decoder-only config, no streaming
        return fit.StreamChoice()
    return fit.auto_streaming(config, cfg, fit.gpu_budget())


def _int8_layers(cfg: C.RunConfig) -> tuple[list[str], list[LayerSensitivity], str]:
    """Adaptive quantization's choice on the first training rows (:func:`select`)."""
    tok = load_tokenizer(resolve_source(cfg.model.source), cfg.model.trust_remote_code)
    stream = dataclasses.replace(cfg.data, streaming=True, eval_ratio=0.0, eval_path=None)
    rows = list(itertools.islice(build_datasets(tok, stream, cfg.train.seed)[0], CALIBRATION_ROWS))
    return select(cfg.model, [torch.tensor([r["input_ids"]]) for r in rows])


def select(model_cfg: C.ModelConfig, batches: list[torch.Tensor]) -> tuple[list[str], list[LayerSensitivity], str]:
    """Measure the 16-bit model of ``model_cfg`` on ``batches`` (token ids, (1, seq) each) and choose
    the int8 layers within ``model_cfg.memory_budget`` (:mod:`qfine.quant.adaptive`): (chosen names,
    every layer's sensitivity, a summary line)."""
    loaded = load_model(dataclasses.replace(model_cfg, quantization="none", int8_modules=[]))
    model = loaded.model.eval()
    names = decoder_linears(model)
    layers = measure(model, batches, names)
    loss_sensitivity(model, batches, layers)
    rows = {n: model.get_submodule(n).out_features for n in names}
    all_nf4 = weight_bytes(model.config, "nf4", model_cfg.double_quant)
    spare = budget_bytes(model_cfg.memory_budget, all_nf4) - all_nf4
    del loaded, model
    gc.collect()
    choose(layers, rows, spare)
    chosen = [s.name for s in layers if s.int8]
    used = sum(extra_int8_bytes(s.params, rows[s.name]) for s in layers if s.int8)
    saved = sum(s.loss_nf4 - s.loss_int8 for s in layers if s.int8)
    total = sum(s.loss_nf4 - s.loss_int8 for s in layers)
    line = (f"adaptive quantization: {len(chosen)} of {len(layers)} linear layers kept in int8 (most loss "
            f"saved per byte: {100 * saved / max(total, 1e-30):.0f}% of the estimated NF4 loss increase over "
            f"{len(batches)} calibration rows), +{used / 2**20:.1f} MiB over all-NF4 "
            f"({(all_nf4 + used) / all_nf4:.3f}× of {all_nf4 / 2**20:.1f} MiB; budget {model_cfg.memory_budget})")
    return chosen, layers, line
