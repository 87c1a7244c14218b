"""K-quant weight error: qfine's encoders against llama.cpp's own, on the same tensors.

llama.cpp's reference quantizers (``quantize_row_q{4,5,6}_K_ref`` of ggml-quants.c) are compiled from
the llama.cpp source that node-llama-cpp ships (tools/llamacpp, ``llama/gitRelease.bundle``) into a
small shared library and called through ctypes; both encodings are decoded by the ``gguf`` package's
dequantizer and compared with the fp32 weights: relative RMS error ‖x̂ − x‖ / ‖x‖ per tensor and over
all of them.

    python bench/kquant_error.py [--model FOLDER] [--out results.json]

Default model: the bundled SmolLM2-135M's weights (the 2-D decoder weights whose rows are whole
256-value super-blocks: its 30 ``down_proj``; they were stored as Q4_1, so they lie on a 4-bit grid),
and a synthetic set: 16 tensors of 1024 × 4096 heavy-tailed values (Student-t, 5 degrees of freedom).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from qfine.export.kquants import QUANTIZERS

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "tools" / "llamacpp" / "node_modules" / "node-llama-cpp" / "llama" / "gitRelease.bundle"
BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
void ggml_log_internal(int level, const char * fmt, ...) {}
size_t ggml_row_size(int type, long long ne) { abort(); }
const char * ggml_type_name(int type) { return "?"; }
size_t ggml_type_size(int type) { abort(); }
long long ggml_blck_size(int type) { abort(); }
"""


def build_reference(work: Path) -> ctypes.CDLL:
    src = work / "llama.cpp"
    subprocess.run(["git", "-c", "advice.detachedHead=false", "clone", "-q", str(BUNDLE), str(src)], check=True)
    (work / "stubs.c").write_text(STUBS)
    lib = work / "libggmlq.so"
    g = src / "ggml"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-I{g / 'include'}", f"-I{g / 'src'}", "-o", str(lib),
                    str(g / "src" / "ggml-quants.c"), str(work / "stubs.c"), "-lm"], check=True)
    return ctypes.CDLL(str(lib))


def llama_cpp_encode(lib, kind: str, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(x.size // 256 * BYTES[kind], dtype=np.uint8)
    fn = getattr(lib, f"quantize_row_{kind[:2]}_K_ref")
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out


def rel_error(kind: str, data: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(squared error, squared norm) of the decoded blocks against ``x``."""
    qtype = GGMLQuantizationType[kind.upper()]
    back = dequantize(data.reshape(-1, BYTES[kind]), qtype).reshape(x.shape)
    return float(((back - x) ** 2).sum()), float((x ** 2).sum())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--out")
    a = p.parse_args()
    from safetensors.torch import load_file

    if a.model is None:
        from qfine.models.sources import bundled_gguf_path, gguf_to_folder

        a.model = str(gguf_to_folder(bundled_gguf_path()))
    model_tensors = {}
    for f in sorted(Path(a.model).glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if v.ndim == 2 and ".layers." in k and v.shape[1] % 256 == 0:
                model_tensors[k] = v.float().numpy()
    rng = np.random.default_rng(0)
    synthetic = {f"t{i}": (0.02 * rng.standard_t(5, size=(1024, 4096))).astype(np.float32) for i in range(16)}
    with tempfile.TemporaryDirectory() as work:
        lib = build_reference(Path(work))
        result = {}
        sets = (("model", model_tensors), ("student-t", synthetic))
        for (label, tensors), kind in ((pair, kind) for pair in sets for kind in ("q4_k", "q5_k", "q6_k")):
            sums = {"qfine": [0.0, 0.0], "llama.cpp": [0.0, 0.0]}
            worst = 0.0
            for x in tensors.values():
                ours = rel_error(kind, QUANTIZERS[kind](x), x)
                ref = rel_error(kind, llama_cpp_encode(lib, kind, x), x)
                for name, (e, n) in (("qfine", ours), ("llama.cpp", ref)):
                    sums[name][0] += e
                    sums[name][1] += n
                worst = max(worst, (ours[0] / ref[0]) ** 0.5 - 1)
            rel = {name: (e / n) ** 0.5 for name, (e, n) in sums.items()}
            result[f"{label} {kind}"] = {"qfine": rel["qfine"], "llama.cpp": rel["llama.cpp"],
                                         "qfine_over_llama_cpp": rel["qfine"] / rel["llama.cpp"] - 1,
                                         "worst_tensor_over": worst, "tensors": len(tensors)}
            print(f"{label} {kind}: relative RMS error qfine {rel['qfine']:.5f}, llama.cpp {rel['llama.cpp']:.5f} "
                  f"({100 * (rel['qfine'] / rel['llama.cpp'] - 1):+.1f} %; worst tensor {100 * worst:+.1f} %) "
                  f"over {len(tensors)} tensors", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
