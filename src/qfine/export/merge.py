"""Exact merge of LoRA adapters into a 16-bit (or fp32) model, layer by layer.

For every adapted linear layer::

    W_merged = cast(dequant(W4).float() + scaling · (B.float() @ A.float()))

onto the dequantized 4-bit weights the adapter was trained against (``base="dequantized"``), or
onto the original 16-bit checkpoint weights (``base="pristine"``, a different model: it adds back
the quantization error the adapter never saw). Nothing is ever requantized silently.

Tensors are produced one module at a time and written to safetensors shards, so peak memory is
about the 4-bit model + one layer in fp32 + one output shard.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qfine import config as C
from qfine.compat.torch import persistent_buffers
from qfine.generation.generate import encode_prompt
from qfine.generation.load import is_run_dir, load_for_inference
from qfine.methods.lora import int4_group
from qfine.methods.merge_rule import merged_weight, unties_embeddings
from qfine.methods.qalora import folded_mins
from qfine.models.heads import head_of
from qfine.models.weights import pristine_reader
from qfine.quant import KINDS
from qfine.quant.bnb4 import guard_cpu_repack
from qfine.quant.int4 import QUANT_METHOD, Int4Linear
from qfine.util.compare import relative_difference
from qfine.util.errors import QfineError
from qfine.util.files import atomic_dir
from qfine.util.log import say

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merged_tensors(model: torch.nn.Module, dtype: torch.dtype,
                   pristine: Callable[[str], torch.Tensor] | None = None,
                   int4: bool = False, adapters: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(state-dict key, tensor in dtype)`` of the merged model, one module at a time.

    ``model`` is a ``PeftModel`` (its active adapters are merged) or a plain model. ``pristine``
    maps a weight key to the original checkpoint tensor, replacing the dequantized base weight.
    Keys are the base model's own (no ``base_model.model.`` or ``.base_layer`` infixes). ``int4``:
    INT4 (QA-LoRA) layers stay 4-bit: their codes and scales as they are, the update folded into the
    minimums (:func:`qfine.methods.qalora.folded_mins`). ``adapters=False``: the base as the adapter
    was trained on (its dequantized weights), without the LoRA update.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = bool(getattr(base.config, "tie_word_embeddings", False)) and not unties_embeddings(base)
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    skip_prefixes: list[str] = []
    written: set[int] = set()  # ids of the parameters yielded so far
    for name, module in base.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, ModulesToSaveWrapper):
            inner = module.modules_to_save[module.active_adapter] if module.active_adapter in module.modules_to_save \
                else module.original_module
            for pname, p in inner.state_dict().items():
                yield prefix + pname, p.detach().to(dtype).contiguous()
            skip_prefixes.append(prefix)
            continue
        if int4 and isinstance(module, (LoraLayer, Int4Linear)):
            lin = module.get_base_layer() if isinstance(module, LoraLayer) else module
            if isinstance(lin, Int4Linear):
                mins = folded_mins(module) if isinstance(module, LoraLayer) else lin.mins
                yield from ((prefix + k, t.contiguous()) for k, t in
                            (("codes", lin.codes), ("scales", lin.scales), ("mins", mins)))
                if lin.bias is not None:
                    yield prefix + "bias", lin.bias.detach().to(dtype).contiguous()
                skip_prefixes.append(prefix)
                continue
        if isinstance(module, LoraLayer):
            lin = module.get_base_layer()
            w = pristine(prefix + "weight").float() if pristine else KINDS.dequantize(lin)
            yield prefix + "weight", (merged_weight(module, w) if adapters else w).to(dtype).contiguous()
            if getattr(lin, "bias", None) is not None:
                yield prefix + "bias", lin.bias.detach().to(dtype).contiguous()
            skip_prefixes.append(prefix)
            continue
        if tied and module is out_emb and name:
            skip_prefixes.append(prefix)  # tied to the input embedding: saved once, under its key
            continue
        if KINDS.is_quantized(module):
            w = pristine(prefix + "weight").float() if pristine else KINDS.dequantize(module)
            yield prefix + "weight", w.to(dtype).contiguous()
            if module.bias is not None:
                yield prefix + "bias", module.bias.detach().to(dtype).contiguous()
            skip_prefixes.append(prefix)
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in written and module is not out_emb:
                continue  # one tensor shared by several modules (T5/BART's embeddings): once, re-tied on load
            t = p.detach().to(dtype)
            yield prefix + pname, (t.clone() if id(p) in written else t).contiguous()
            written.add(id(p))
        for bname, b in persistent_buffers(module):
            yield prefix + bname, b.detach().contiguous()


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int = 2 * 2**30) -> int:
    """Write ``tensors`` as ``model-0000i-of-0000n.safetensors`` + index; returns total bytes.

    Holds at most one shard in memory.
    """
    shards: list[tuple[str, list[str]]] = []
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal buf, size
        if buf:
            name = f"shard-{len(shards) + 1:05d}.safetensors"
            save_file({k: v.cpu() for k, v in buf.items()}, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(buf)))
            buf, size = {}, 0

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if buf and size + nbytes > max_shard_bytes:
            flush()
        buf[key] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    if n == 1:
        (out / shards[0][0]).rename(out / "model.safetensors")
        return total
    weight_map = {}
    for i, (name, keys) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def save_merged(model: torch.nn.Module, tokenizer, out: str | Path, dtype: str = "bf16",
                base: str = "dequantized", source: str | None = None, max_shard_bytes: int = 2 * 2**30,
                overwrite: bool = False, int4: bool = False) -> Path:
    """Merge ``model``'s active adapters and write a plain transformers folder to ``out`` atomically.

    ``base="pristine"`` reads the original weights of ``source`` instead of dequantizing. ``int4``:
    a model over an INT4 (QA-LoRA) base stays 4-bit, its update folded into the zero points (a folder
    qfine loads and exports; ``dtype`` then applies to the layers that are not INT4).
    """
    if dtype not in DTYPES:
        raise QfineError(f"--dtype must be bf16, fp16 or fp32, not {dtype!r}")
    if base not in ("dequantized", "pristine"):
        raise QfineError(f"--base must be dequantized or pristine, not {base!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise QfineError(f"{out} already exists; pass --overwrite to replace it")
    reader = pristine_reader(source) if base == "pristine" else None
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    group = int4_group(base_model)
    if int4 and (group is None or base != "dequantized"):
        raise QfineError("a 4-bit merge needs a run over an int4 (QA-LoRA) base, merged onto its dequantized weights")
    config = copy.deepcopy(base_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if int4:
        config.quantization_config = {"quant_method": QUANT_METHOD, "bits": 4, "group_size": group,
                                      "layout": "W = d * q + m per group of group_size input columns"}
    if unties_embeddings(base_model):
        # both embeddings are written (see merged_tensors); a tied config would make a reload drop one
        for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            c.tie_word_embeddings = False
    config.dtype = str(DTYPES[dtype]).removeprefix("torch.")
    config.use_cache = True
    with atomic_dir(out, replace=overwrite) as tmp:
        write_sharded(merged_tensors(model, DTYPES[dtype], reader, int4=int4), tmp, max_shard_bytes)
        config.save_pretrained(tmp)
        if getattr(base_model, "generation_config", None) is not None:
            base_model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def requantize_folder(merged_dir: str | Path, out: str | Path, quant: str = "nf4", double_quant: bool = True,
                      overwrite: bool = False) -> Path:
    """Write a bitsandbytes 4-bit copy of a merged 16-bit folder — the lossy deployment path.

    The merged weights are quantized afresh, so the result differs from the trained model by the
    new quantization error; callers report the measured logit difference.
    """
    if quant not in ("nf4", "fp4"):
        raise QfineError(f"--requantize must be nf4 or fp4, not {quant!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise QfineError(f"{out} already exists; pass --overwrite to replace it")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=torch.float32 if not torch.cuda.is_available() else torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=cfg, device_map={"": device})
    with atomic_dir(out, replace=overwrite) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(merged_dir).save_pretrained(tmp)
    return out


@dataclass
class Merged:
    """What :func:`merge_run` wrote: the folder, its weights' form, the seconds it took, and for a
    requantized merge the measured logit difference from the unmerged trained model."""

    out: Path
    form: str
    seconds: float
    requantized_diff: float | None = None


def merge_run(run_dir: str | Path, out: str | Path, dtype: str = "bf16", base: str = "dequantized",
              requantize: str | None = None, form: str = "auto", overwrite: bool = False,
              task: str | None = None) -> Merged:
    """``qfine merge``: a run's adapter merged exactly into a model folder ``out``.

    ``form``: ``16bit`` (dequantize and add, ``dtype``), ``int4`` (a QA-LoRA run's update folded into its
    INT4 base's zero points, still 4-bit), or ``auto`` (int4 for QA-LoRA runs). ``requantize``: write a
    bitsandbytes 4-bit folder instead (lossy; the logit difference is measured and returned). ``task``:
    a multi-task run's task, merged with the shared adapter."""
    if not is_run_dir(run_dir):
        raise QfineError(f"{run_dir} is not a finished qfine run (config.yaml and adapter/ expected)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise QfineError(f"{out} already exists; pass --overwrite to replace it")
    run_cfg = C.load_yaml(Path(run_dir) / "config.yaml")
    int4 = form == "int4" or (form == "auto" and run_cfg.lora.method == "qa-lora" and not requantize)
    if int4 and run_cfg.model.quantization != "int4":
        raise QfineError(f"--format int4 folds a QA-LoRA update into an int4 base; this run's base is "
                         f"{run_cfg.model.quantization} (merge to 16-bit: --format 16bit)")
    if requantize and not head_of(run_cfg.model.task).chat:
        raise QfineError(f"--requantize serves causal-lm runs; this is a {run_cfg.model.task} run: merge it to "
                         "16-bit instead")
    loaded = load_for_inference(str(run_dir), task=task)
    if base == "pristine":
        say("merging onto the pristine 16-bit weights: this adds back the quantization error the adapter never saw "
            "during training, so the result differs from the trained model")
    t0 = time.perf_counter()
    diff = None
    if requantize:
        tmp16 = out.with_name(f".{out.name}.merged16")
        save_merged(loaded.model, loaded.tokenizer, tmp16, dtype, base, loaded.source, overwrite=True)
        try:
            requantize_folder(tmp16, out, requantize, overwrite=overwrite)
        finally:
            shutil.rmtree(tmp16, ignore_errors=True)
        diff = requantized_difference(loaded, out)
        say(f"requantized merge: logits differ from the unmerged trained model by {diff:.3e} (relative L2) — lossy "
            "by design")
    else:
        save_merged(loaded.model, loaded.tokenizer, out, dtype, base, loaded.source, overwrite=overwrite, int4=int4)
    form_shown = ("4-bit (codes unchanged, the update folded into the zero points)" if int4 else
                  f"{requantize} (requantized)" if requantize else dtype)
    return Merged(out, form_shown, time.perf_counter() - t0, diff)


@torch.no_grad()
def requantized_difference(loaded, out: Path) -> float:
    """Relative L2 difference of a requantized merge's logits from the unmerged trained model's."""
    ids = encode_prompt(loaded.tokenizer, [{"role": "user", "content": "Tell me about yourself."}]).to(loaded.device)
    ref = loaded.model(input_ids=ids).logits.float()
    q = AutoModelForCausalLM.from_pretrained(out, device_map={"": loaded.device})
    guard_cpu_repack(q)
    return relative_difference(q(input_ids=ids).logits.float(), ref)
