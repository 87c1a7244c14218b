"""``qfine export``: a run (merged exactly on the way) or a merged folder, as a deployment file.

* ``--format gguf --quant f16|bf16|q8_0|q4_0|q4_1|q4_k_m|q5_k_m|q6_k``: one GGUF file for
  llama.cpp-family runtimes (:mod:`.gguf_file`), with a report beside it (``FILE.gguf.report.json``):
  every tensor's type, size and error, and the file's logits read back by transformers' own GGUF
  loader against the merged model's, on a few prompts; and an Ollama Modelfile (``FILE.gguf.Modelfile``,
  :mod:`.modelfile`). ``--verify`` adds llama.cpp's own scores of the file (:mod:`.verify`).
* ``--format bnb-nf4``: a bitsandbytes 4-bit folder (what ``qfine merge --requantize nf4`` writes).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from qfine import config as C
from qfine.data.templates import set_template
from qfine.export.gguf_file import write_gguf
from qfine.export.modelfile import write_modelfile
from qfine.generation.generate import encode_prompt
from qfine.generation.load import is_run_dir, load_for_inference
from qfine.methods.lora import merged
from qfine.models.loading import load_model
from qfine.models.sources import read_gguf
from qfine.util.compare import relative_difference
from qfine.util.errors import QfineError

PROMPTS = ("Tell me about yourself.", "What is the capital of France?", "Write one sentence about rain.")
READABLE_BY_TRANSFORMERS = ("llama", "qwen2")  # GGUF architectures transformers' reader loads


def load_source(source: str):
    """``(model, tokenizer, base source)`` in fp32 on the CPU: a run's base + adapter (merged when
    written), or a plain model folder (a ``qfine merge`` output, say)."""

    if is_run_dir(source):
        cfg = C.load_yaml(Path(source) / "config.yaml")
        if cfg.model.task != "causal-lm":
            raise QfineError(f"GGUF export serves causal-lm models; {source} is a {cfg.model.task} run")
        loaded = load_for_inference(source, None)
        return loaded.model, loaded.tokenizer, loaded.source
    if not Path(source).is_dir():
        raise QfineError(f"{source} is neither a qfine run nor a model folder")
    loaded = load_model(C.ModelConfig(source=source, quantization="none", compute_dtype="fp32", device="cpu"))
    return loaded.model.eval(), loaded.tokenizer, loaded.source


def _apply_rope_freqs(reader, gguf_path: Path) -> None:
    """transformers' GGUF reader ignores ``rope_freqs.weight`` (Llama 3's scaled RoPE) and builds plain
    RoPE; divide its inverse frequencies by the file's factors, as llama.cpp divides the angles, so
    the check reads the factors from the file like a runtime does."""

    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    if "rope_freqs.weight" not in tensors:
        return
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data, dtype=np.float32))
    rotary = reader.model.rotary_emb
    inv = rotary.inv_freq.float().cpu() / factors
    rotary.inv_freq = inv.to(rotary.inv_freq.device)
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = rotary.inv_freq


@torch.no_grad()
def check_logits(model, tokenizer, gguf_path: Path) -> dict[str, float]:
    """Relative L2 difference of the GGUF file's logits (read by transformers) from ``model``'s
    merged logits, per prompt of :data:`PROMPTS`."""
    with merged(model, torch.float32) if hasattr(model, "peft_config") else contextlib.nullcontext():
        reader = read_gguf(gguf_path, "fp32").eval()
        _apply_rope_freqs(reader, gguf_path)
        out = {}
        for prompt in PROMPTS:
            ids = encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
            ref = model(input_ids=ids.to(next(model.parameters()).device)).logits.float()
            out[prompt] = relative_difference(reader(input_ids=ids).logits.float(), ref)
        return out


def export_gguf(source: str, out: str | Path, quant: str, overwrite: bool = False, check: bool = True,
                verify: bool = False, verify_data: str | None = None, imatrix: bool = True,
                imatrix_data: str | None = None):
    """Write ``source`` (run or model folder) to ``out`` as GGUF; returns the saved report. ``verify``:
    score the file in llama.cpp against the merged model (:mod:`.verify`), on ``verify_data`` if given.
    ``imatrix``: for the 4- to 6-bit types, an importance matrix from the run's training rows (or
    ``imatrix_data``), kept per tensor where it lowers the error (:mod:`.imatrix`)."""
    from qfine.export import imatrix as I
    from qfine.export import verify as V

    out = Path(out)
    if out.suffix != ".gguf":
        raise QfineError(f"--out must name a .gguf file, not {out}")
    if out.exists() and not overwrite:
        raise QfineError(f"{out} already exists; pass --overwrite to replace it")
    if verify and V.runtime_dir() is None:  # before the long part
        raise QfineError(f"--verify: {V.MISSING}")
    model, tokenizer, base = load_source(source)
    set_template(tokenizer, "auto")
    importance, where = None, ""
    if imatrix and quant in ("q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"):
        sequences, where = I.training_sequences(source, tokenizer, imatrix_data)
        importance = I.collect(model, sequences) if sequences else None
    report = write_gguf(model, tokenizer, base, out, quant, name=Path(source).name, importance=importance)
    if importance:
        report.imatrix = where
    elif where:
        report.add_note(f"no importance matrix: {where}")
    report.modelfile = str(write_modelfile(out, tokenizer, base))
    if check and report.arch in READABLE_BY_TRANSFORMERS:
        report.logits = check_logits(model, tokenizer, out)
    elif check:
        report.add_note(f"logits not read back: transformers' GGUF reader does not load {report.arch} files; the "
                        "per-tensor errors above are from the gguf package's own dequantizer")
    if verify:
        sequences, where = V.held_out(source, tokenizer, verify_data)
        report.verify = V.verify(model, tokenizer, out, sequences, where)
    report.save(out.with_name(out.name + ".report.json"))
    return report
