"""A run's adapter alone as a llama.cpp LoRA GGUF (``llama-cli -m BASE.gguf --lora ADAPTER.gguf``):
one base file, several small adapters.

llama.cpp adds ``scale · alpha / r · B (A x)`` to each adapted weight's output, with ``r`` read from
``lora_a``'s shape and the user's ``scale`` (1 by default). The file carries, per adapted linear of
GGUF name ``blk.N.attn_q.weight``, the pair ``blk.N.attn_q.weight.lora_a`` (r × in) and ``.lora_b``
(out × r) in fp32, and ``adapter.lora.alpha`` = qfine's scaling × r, so rank-stabilised scalings
(α/√r) come out right too. ``lora_b``'s rows go through the same rearrangement as the base weight's
(Llama's q/k rows to interleaved RoPE pairs), ``lora_a`` is the base's column space and unchanged.

What a LoRA pair cannot carry is refused by name: DoRA's magnitudes, QA-LoRA's group-pooled input,
parts trained in full (embeddings, head), and several active adapters at once.

The base it applies to must be the model the adapter was trained against: ``base_out`` writes it too,
as the run saw it (the dequantized 4-bit weights), so the pair computes what the run computes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from qfine import config as C
from qfine.export import layout
from qfine.export.gguf_file import write_gguf
from qfine.export.modelfile import write_modelfile
from qfine.generation.load import is_run_dir, load_for_inference
from qfine.quant.int4 import Int4Linear
from qfine.util.errors import QfineError


def lora_pairs(model) -> tuple[list[tuple[str, np.ndarray, np.ndarray, float]], int]:
    """``([(base weight key, A (r, in), B (out, r), scaling)], r)`` of a PeftModel's active adapter."""
    base = model.get_base_model()
    active = list(getattr(model, "active_adapters", None) or [model.active_adapter])
    if len(active) != 1:
        raise QfineError(f"--format gguf-lora writes one adapter; this run has {len(active)} active ({', '.join(active)})")
    name = active[0]
    pairs, ranks = [], set()
    for key, module in base.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            raise QfineError(f"--format gguf-lora: {key} was trained in full (lora.trainable), which a LoRA GGUF cannot "
                             "carry; export the merged model instead (--format gguf)")
        if not isinstance(module, LoraLayer) or name not in module.lora_A:
            continue
        if name in getattr(module, "lora_magnitude_vector", {}):
            raise QfineError("--format gguf-lora: DoRA's per-row magnitudes are not a LoRA pair; export the merged "
                             "model instead (--format gguf)")
        if isinstance(module.get_base_layer(), Int4Linear):
            raise QfineError("--format gguf-lora: a QA-LoRA adapter reads group-pooled inputs; export the merged "
                             "model instead (--format gguf)")
        a = module.lora_A[name].weight.detach().float().cpu().numpy()
        b = module.lora_B[name].weight.detach().float().cpu().numpy()
        pairs.append((f"{key}.weight", a, b, float(module.scaling[name])))
        ranks.add(a.shape[0])
    if not pairs:
        raise QfineError("--format gguf-lora: the run's adapter adapts no linear layer")
    if len(ranks) != 1 or len({s for *_, s in pairs}) != 1:
        raise QfineError("--format gguf-lora: llama.cpp takes one alpha for the whole file, and this adapter's layers "
                         "differ in rank or scaling; export the merged model instead")
    return pairs, ranks.pop()


def export_gguf_lora(run_dir: str | Path, out: str | Path, overwrite: bool = False,
                     base_out: str | Path | None = None, base_quant: str = "f16") -> str:
    """Write the run's adapter to ``out`` (and, with ``base_out``, the base it was trained on as GGUF of
    type ``base_quant``); returns a line saying what was written."""
    out = Path(out)
    if not is_run_dir(run_dir):
        raise QfineError(f"--format gguf-lora needs a finished qfine run, not {run_dir}")
    if out.suffix != ".gguf":
        raise QfineError(f"--out must name a .gguf file, not {out}")
    for path in (out, Path(base_out) if base_out else None):
        if path is not None and path.exists() and not overwrite:
            raise QfineError(f"{path} already exists; pass --overwrite to replace it")
    cfg = C.load_yaml(Path(run_dir) / "config.yaml")
    if cfg.model.task != "causal-lm":
        raise QfineError(f"GGUF export serves causal-lm models; {run_dir} is a {cfg.model.task} run")
    loaded = load_for_inference(str(run_dir))
    t0 = time.perf_counter()
    pairs, rank = lora_pairs(loaded.model)
    config = loaded.model.get_base_model().config
    arch = layout.arch_of(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = GGUFWriter(str(tmp), arch.name)
        writer.add_name(f"{Path(run_dir).name} (LoRA)")
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", pairs[0][3] * rank)
        for key, a, b, _ in pairs:
            gname = layout.gguf_name(key)
            if gname is None:
                raise QfineError(f"--format gguf-lora: {key} has no llama.cpp tensor name")
            writer.add_tensor(f"{gname}.lora_a", np.ascontiguousarray(a))
            writer.add_tensor(f"{gname}.lora_b", np.ascontiguousarray(layout.to_gguf(arch, config, gname, b)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    line = (f"LoRA GGUF: {len(pairs)} adapted linears, r={rank}, alpha {pairs[0][3] * rank:g}, "
            f"{out.stat().st_size / 2**20:.2f} MiB in {time.perf_counter() - t0:.1f} s: {out}")
    if base_out is not None:
        with torch.no_grad():
            report = write_gguf(loaded.model, loaded.tokenizer, loaded.source, Path(base_out), base_quant,
                                name=f"{Path(run_dir).name} base", adapters=False)
        modelfile = write_modelfile(Path(base_out), loaded.tokenizer, loaded.source, adapter=out)
        line += f"; the base it was trained on ({base_quant}): {report.path}; Ollama: {modelfile}"
    return line
