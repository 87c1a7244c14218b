"""Loading what qfine serves: a run directory (its base quantized as trained, plus its adapter), or a
model source as it was written (a merged folder in its saved dtype, a GGUF at its file's precision),
quantized on load only when asked, with the measured cost then printed."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from qfine import config as C
from qfine.data.templates import set_template
from qfine.generation.generate import encode_prompt
from qfine.methods.lora import load_adapter
from qfine.methods.multitask import check_task, load_task, run_tasks
from qfine.models.heads import head_of, read_labels
from qfine.models.loading import Loaded, load_model, prequantized, resolve_device
from qfine.models.sources import resolve_source, written_dtype
from qfine.util.compare import relative_difference
from qfine.util.errors import QfineError
from qfine.util.integrity import check_folder


def is_run_dir(path: str | Path) -> bool:
    """A qfine run directory has config.yaml and adapter/adapter_config.json (a multi-task run:
    adapter/shared/adapter_config.json)."""
    p = Path(path)
    return (p / "config.yaml").is_file() and any((p / "adapter" / sub / "adapter_config.json").is_file()
                                                 for sub in ("", "shared"))


def load_for_inference(target: str, model_cfg: C.ModelConfig | None = None, task: str | None = None) -> Loaded:
    """Load a run directory (its base, quantized as in training, + its adapter) or a model source.

    A plain model source is served as it was written (:func:`as_written`: a merged folder in its saved
    dtype, a GGUF at its file's precision), unless ``model_cfg`` says how to load it; quantizing an
    unquantized source then prints its measured cost (:func:`quantization_cost`).
    ``task``: a multi-task run's task, whose adapter is then active with the shared one (required
    for such a run, refused for any other).
    """

    if is_run_dir(target):
        cfg = C.load_yaml(Path(target) / "config.yaml")
        labels = read_labels(Path(target)) if head_of(cfg.model.task).labelled else None
        adapter_dir = Path(target) / "adapter"
        check_folder(adapter_dir, recursive=True)
        multi = bool(run_tasks(adapter_dir))
        if task is not None and not multi:
            raise QfineError(f"--task-adapter: {target} is not a multi-task run (it has one adapter)")
        if multi:
            check_task(adapter_dir, task)  # before the base is loaded
        loaded = load_model(cfg.model, labels)
        loaded.model = (load_task(loaded.model, adapter_dir, task) if multi
                        else load_adapter(loaded.model, adapter_dir))
        loaded.data, loaded.generation = cfg.data, cfg.generation
        template = cfg.data.template
    else:
        if task is not None:
            raise QfineError(f"--task-adapter needs a multi-task run directory, not {target}")
        if Path(target).is_dir() and (Path(target) / "config.yaml").is_file():
            raise QfineError(f"{target} looks like a qfine run without a finished adapter (adapter/ missing)")
        if model_cfg is None:
            loaded = load_model(as_written(target))
        else:
            mc = dataclasses.replace(model_cfg, source=target)
            loaded = load_model(mc)
            if mc.quantization != "none" and not prequantized(loaded.source):
                print(f"[qfine] {quantization_cost(loaded, mc)}", file=sys.stderr, flush=True)
        template = "auto"
    loaded.model.eval()
    loaded.model.config.use_cache = True
    if head_of(loaded.task).chat:
        set_template(loaded.tokenizer, template)
    return loaded


def as_written(source: str) -> C.ModelConfig:
    """How to load ``source`` so that it computes what was saved: no quantization (a folder saved
    quantized keeps its own), weights in their saved dtype. On the CPU a 16-bit folder is widened to
    fp32 (exactly: every fp16/bf16 value is an fp32 value), which the CPU computes faster."""
    dtype = written_dtype(resolve_source(source)) or "auto"
    if resolve_device("auto") == "cpu" and dtype in ("fp16", "bf16"):
        dtype = "fp32"
    return C.ModelConfig(source=source, quantization="none", compute_dtype=dtype)


# The fixed prompt a load-time quantization is measured on: a chat turn, so that the template's tokens count too.
_COST_PROMPT = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


@torch.no_grad()
def quantization_cost(quantized: Loaded, cfg: C.ModelConfig) -> str:
    """A line giving how far ``quantized`` (``source`` loaded per ``cfg``) answers from the same source
    as written: the relative L2 difference of their logits on a fixed prompt. The unquantized model is
    loaded for the measurement and freed; where it does not fit, the line says so."""

    set_template(quantized.tokenizer, "auto")
    ids = encode_prompt(quantized.tokenizer, _COST_PROMPT)
    got = quantized.model(input_ids=ids.to(quantized.device)).logits.float().cpu()
    try:
        reference = load_model(as_written(cfg.source))
        want = reference.model(input_ids=ids.to(reference.device)).logits.float().cpu()
    except torch.OutOfMemoryError:
        return (f"{cfg.source} quantized to {cfg.quantization} on load, as asked; its cost was not measured (the "
                "unquantized model does not fit beside it)")
    return (f"{cfg.source} quantized to {cfg.quantization} on load, as asked: its logits differ from the model as "
            f"written by {relative_difference(got, want):.3e} (relative L2, on a fixed prompt); omit --quantization "
            "to serve it as written")
