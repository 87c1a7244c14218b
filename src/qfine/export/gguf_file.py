"""Write a merged model as one GGUF file, in-process (no llama.cpp build, no download).

Two passes keep memory at one tensor: the exact merge (:func:`qfine.export.merge.merged_tensors`, fp32)
yields one tensor at a time, which is renamed and rewritten for GGML (:mod:`.layout`), encoded
(F32/F16/BF16 and Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 by the ``gguf`` package's own quantizer, the K-quants by
:mod:`.kquants`), decoded again with ``gguf.quants.dequantize`` to measure its error, and spilled to
a temporary file; then the header, metadata and tensor table are written and the spilled bytes
copied behind them. The file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from qfine.export import layout, legacy_quants, vocab
from qfine.export.kquants import QUANTIZERS
from qfine.export.merge import merged_tensors
from qfine.util.errors import QfineError
from qfine.util.files import atomic_write_text


@dataclass
class TensorRecord:
    """One written tensor: GGUF name, numpy shape, GGML type, bytes, and the relative L2 error and
    largest absolute error of its decoded values against the merged fp32 tensor."""

    name: str
    shape: tuple[int, ...]
    type: str
    nbytes: int
    rel_error: float
    max_error: float
    offset: int = 0  # in the spill file
    imatrix: bool | None = None  # encoded with the importance matrix (None: there was none for it)


@dataclass
class ExportReport:
    """What :func:`write_gguf` wrote."""

    path: str
    quant: str
    arch: str
    tensors: list[TensorRecord] = field(default_factory=list)
    seconds: float = 0.0
    logits: dict[str, float] = field(default_factory=dict)  # prompt → relative L2 vs the merged model
    note: str = ""
    imatrix: str = ""  # where the importance matrix came from ("" when none was used)
    verify: dict = field(default_factory=dict)  # llama.cpp's scores of the file (qfine.export.verify)
    modelfile: str = ""  # the Ollama Modelfile written beside it

    def add_note(self, text: str) -> None:
        self.note = "; ".join(filter(None, [self.note, text]))

    def types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + 1
        return out

    def summary(self) -> str:
        size = sum(t.nbytes for t in self.tensors)
        worst = max(self.tensors, key=lambda t: t.rel_error)
        lines = [f"{self.path}: {self.arch}, {self.quant}, {len(self.tensors)} tensors, {size / 2**20:,.1f} MiB of "
                 f"weights in {self.seconds:.1f} s; types {', '.join(f'{k}×{v}' for k, v in sorted(self.types().items()))}",
                 f"largest tensor error: {worst.name} ({worst.type}) {worst.rel_error:.2e} relative L2"]
        if self.imatrix:
            weighed = [t for t in self.tensors if t.imatrix is not None]
            lines.append(f"importance matrix from {self.imatrix}: kept for {sum(bool(t.imatrix) for t in weighed)} of "
                         f"{len(weighed)} quantized tensors (where it lowered the importance-weighted error)")
        if self.logits:
            lines.append("logits of the file (read back by transformers) vs the merged model: "
                         + ", ".join(f"{v:.2e}" for v in self.logits.values()) + " relative L2")
        if self.note:
            lines.append(self.note)
        if self.modelfile:
            lines.append(f"Ollama: ollama create NAME -f {self.modelfile}")
        if self.verify:
            from qfine.export.verify import summary

            lines.append(summary(self.verify))
        return "\n".join(lines)

    def save(self, path: Path) -> None:

        atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")


def encode(x: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
    """``x`` (fp32) in GGML type ``kind``: a float array for F32/F16, else the block bytes (uint8).
    ``importance``: per-column weights for the search of the types in :data:`WEIGHTED` (:mod:`.imatrix`)."""

    if kind == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if kind == "F16":
        return np.ascontiguousarray(x, dtype=np.float16)
    if kind.lower() in QUANTIZERS:
        return QUANTIZERS[kind.lower()](x, importance)
    if importance is not None and kind.lower() in legacy_quants.TYPES:
        return legacy_quants.quantize(x, kind.lower(), importance)
    return quantize(np.ascontiguousarray(x, dtype=np.float32), GGMLQuantizationType[kind])


def decode(data: np.ndarray, kind: str) -> np.ndarray:
    """The values GGML reads from ``data`` (the gguf package's reference dequantizer), fp32."""

    if kind in ("F32", "F16"):
        return data.astype(np.float32)
    return dequantize(data, GGMLQuantizationType[kind]).astype(np.float32)


WEIGHTED = ("Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # the types an importance matrix steers
_CHUNK_VALUES = 1 << 23  # rows encoded together: the vectorised K-quant search holds ~20 arrays this size


def encode_to(spill, x: np.ndarray, kind: str, importance: np.ndarray | None = None,
              weigh: np.ndarray | None = None) -> tuple[int, float, float, float]:
    """Encode ``x`` (fp32, rows last-axis) in ``kind`` into the open file ``spill``, a block of rows at a
    time (every GGML type encodes rows independently, so the bytes equal :func:`encode` of the whole);
    returns (bytes written, relative L2 error, largest absolute error, error weighted by the columns'
    ``weigh`` (0 without)) of the decoded values. ``importance`` goes to the encoder."""
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    step = max(1, _CHUNK_VALUES // rows.shape[1])
    nbytes, err2, norm2, worst, weighted = 0, 0.0, 0.0, 0.0, 0.0
    for start in range(0, rows.shape[0], step):
        part = np.ascontiguousarray(rows[start:start + step])
        data = encode(part, kind, importance)
        diff = decode(data, kind).reshape(part.shape).astype(np.float64) - part
        err2 += float(np.square(diff).sum())
        norm2 += float(np.square(part, dtype=np.float64).sum())
        worst = max(worst, float(np.abs(diff).max(initial=0.0)))
        if weigh is not None:
            weighted += float((weigh * np.square(diff).sum(axis=0)).sum())
        spill.write(data.tobytes())
        nbytes += data.nbytes
    return nbytes, (err2 ** 0.5 / norm2 ** 0.5) if norm2 else 0.0, worst, weighted


def encode_best(spill, x: np.ndarray, kind: str, importance: np.ndarray) -> tuple[int, float, float, bool]:
    """:func:`encode_to` with and without ``importance``, keeping the encoding whose importance-weighted
    error is lower; the last value says whether that was the weighted search."""
    found = []
    for imp in (importance, None):
        buf = io.BytesIO()
        found.append((*encode_to(buf, x, kind, imp, importance.astype(np.float64)), buf))
    with_imp, plain = found
    best = with_imp if with_imp[3] <= plain[3] else plain
    spill.write(best[4].getbuffer())
    return best[0], best[1], best[2], best is with_imp


def write_gguf(model, tokenizer, source: str, out: Path, quant: str, name: str = "",
               adapters: bool = True, importance: dict[str, np.ndarray] | None = None) -> ExportReport:
    """Merge ``model`` (a PeftModel or a plain causal LM) exactly and write it to ``out`` as GGUF of
    file type ``quant`` (see :data:`layout.FILE_TYPES`); returns the report (logits not yet checked).
    ``adapters=False`` writes the base the adapters were trained on, without them. ``importance``
    (GGUF name → per-column weights, :mod:`.imatrix`): each tensor of a :data:`WEIGHTED` type that has
    one is encoded with and without it and keeps the lower importance-weighted error."""


    if quant not in layout.FILE_TYPES:
        raise QfineError(f"--quant must be one of {', '.join(layout.FILE_TYPES)}, not {quant!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    arch = layout.arch_of(config)
    tok_fields = vocab.tokenizer_fields(tokenizer, config.vocab_size, source)
    t0 = time.perf_counter()
    report = ExportReport(str(out), quant, arch.name, note=vocab.divergence(tokenizer))
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in base.state_dict().items()]
    has_output = any(layout.gguf_name(k) == "output.weight" for k in keys) and not getattr(
        config, "tie_word_embeddings", False)
    # no_grad: a model straight from training has trainable LoRA weights, and the merge must not
    # build an autograd graph over every layer (nor hand numpy a tensor that requires grad)
    with tempfile.TemporaryFile(dir=out.parent) as spill, torch.no_grad():
        for key, tensor in merged_tensors(model, torch.float32, adapters=adapters):
            gname = layout.gguf_name(key)
            if gname is None:
                continue
            if gname == "output.weight":
                has_output = True
            x = layout.to_gguf(arch, config, gname, tensor.detach().cpu().numpy())
            kind = layout.tensor_type(quant, gname, x.shape, config.num_hidden_layers, has_output)
            offset = spill.tell()
            imp = (importance or {}).get(gname) if kind in WEIGHTED else None
            if imp is None:
                nbytes, rel, worst, _ = encode_to(spill, x, kind)
                used = None
            else:
                nbytes, rel, worst, used = encode_best(spill, x, kind, imp)
            report.tensors.append(TensorRecord(gname, tuple(x.shape), kind, nbytes, rel, worst, offset, used))
        factors = layout.rope_factors(config)
        if factors is not None:  # Llama 3's scaled RoPE: llama.cpp reads the divisors from this tensor
            report.tensors.append(TensorRecord("rope_freqs.weight", tuple(factors.shape), "F32",
                                               int(factors.nbytes), 0.0, 0.0, spill.tell()))
            factors.tofile(spill)
        if not any(t.name == "token_embd.weight" for t in report.tensors):
            raise QfineError("the merged model has no input embedding (model.embed_tokens) to write")
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            writer = GGUFWriter(str(tmp), arch.name)
            writer.add_name(name or Path(source).name)
            for key, value in layout.model_fields(arch, config).items():
                _add(writer, f"{arch.name}.{key}", value)
            writer.add_file_type(layout.FILE_TYPES[quant][0])
            writer.add_quantization_version(2)
            for key, value in tok_fields.items():
                _add(writer, f"tokenizer.{key}", value)
            for t in report.tensors:
                if t.type in ("F32", "F16"):
                    dtype = np.float32 if t.type == "F32" else np.float16
                    writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes)
                else:
                    rows = int(np.prod(t.shape[:-1]))
                    writer.add_tensor_info(t.name, (rows, t.nbytes // rows), np.dtype(np.uint8), t.nbytes,
                                           raw_dtype=GGMLQuantizationType[t.type])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in report.tensors:
                spill.seek(t.offset)
                dtype = {"F32": np.float32, "F16": np.float16}.get(t.type, np.uint8)
                writer.write_tensor_data(np.frombuffer(spill.read(t.nbytes), dtype=dtype))
            writer.close()
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    report.seconds = time.perf_counter() - t0
    return report


def _add(writer, key: str, value) -> None:
    """One metadata entry, typed as llama.cpp reads it (ids and counts uint32, floats f32)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)
