"""q4_k_m (and q5_k_m, q6_k) as qfine writes it against llama.cpp's own encoding of the same weights,
scored by llama.cpp: KL divergence to the f16 file's next-token distributions.

llama.cpp's file is qfine's file with every tensor's bytes replaced by ``ggml_quantize_chunk`` of the
same fp32 values in the same GGML type (the prebuilt ``libggml-base.so`` that node-llama-cpp ships,
llama.cpp 80fb11a, called through ctypes), without an importance matrix (``llama-quantize`` without
``--imatrix``) and with qfine's (collected over README.md's paragraphs, not the evaluation text),
given to the K-quant tensors only (what qfine weighs) or to every tensor (what llama.cpp does). So the two files differ only in their encoders; the type of each tensor is the one
qfine's mix chose (llama.cpp's q4_k_m rules). All three files are run by llama.cpp (run.mjs) on the
same token ids: 8 pieces of 128 tokens of docs/*.md.

    python bench/kquant_kl.py [--model FOLDER] [--quants q4_k_m,q5_k_m,q6_k] [--out results.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from qfine.cli import main as qfine
from qfine.export.verify import next_token_probs

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "tools" / "llamacpp" / "node_modules" / "@node-llama-cpp" / "linux-x64" / "bins" / "linux-x64"


def ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(LIB / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def llama_cpp_copy(ours: Path, f16: Path, out: Path, lib, importance: dict | None = None,
                   k_only: bool = True) -> int:
    """``ours`` with each quantized tensor re-encoded by ggml from the f16 file's values (with the
    tensor's importance vector where given, for the K-quant tensors only or for every type); count."""
    shutil.copyfile(ours, out)
    values = {t.name: t for t in GGUFReader(str(f16)).tensors}
    n = 0
    with open(out, "r+b") as f:
        for t in GGUFReader(str(ours)).tensors:
            kind = t.tensor_type
            if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                continue
            x = np.ascontiguousarray(np.asarray(values[t.name].data, dtype=np.float32))
            rows, cols = int(np.prod(x.shape[:-1])), x.shape[-1]
            dst = np.zeros(t.n_bytes, dtype=np.uint8)
            imp = (importance or {}).get(t.name)
            if imp is not None and k_only and kind.name not in ("Q4_K", "Q5_K", "Q6_K"):
                imp = None
            imp = None if imp is None else np.ascontiguousarray(imp, dtype=np.float32)
            size = lib.ggml_quantize_chunk(int(kind), x.ctypes.data, dst.ctypes.data, 0, rows, cols,
                                           None if imp is None else imp.ctypes.data)
            assert size == t.n_bytes, (t.name, size, t.n_bytes)
            f.seek(t.data_offset)
            f.write(dst.tobytes())
            n += 1
    return n


def token_pieces(folder: Path, n: int = 8, length: int = 128) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tok.encode(text, add_special_tokens=False)
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def calibration(folder: Path, tmp: Path) -> Path:
    """README.md's paragraphs as text rows (not the evaluation text): the importance matrix's data."""
    rows = [p for p in (ROOT / "README.md").read_text().split("\n\n") if len(p) > 80]
    path = tmp / "calibration.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in rows))
    return path


def kl_top1(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, float]:
    lp, lq = np.log(np.maximum(p, 1e-30)), np.log(np.maximum(q, 1e-30))
    return (p * (lp - lq)).sum(-1), float((p.argmax(-1) == q.argmax(-1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a model folder (default: the bundled model, converted)")
    ap.add_argument("--quants", default="q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.model:
        folder = Path(args.model)
    else:
        from qfine.models.sources import bundled_gguf_path, gguf_to_folder

        folder = Path(gguf_to_folder(bundled_gguf_path()))
    lib = ggml()
    results = {"model": str(folder), "text": "docs/*.md, 8 × 128 tokens", "quants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f16 = tmp / "f16.gguf"
        assert qfine(["export", str(folder), "--quant", "f16", "--out", str(f16), "--no-check"]) == 0
        pieces = token_pieces(folder)
        n_vocab = len(GGUFReader(str(f16)).fields["tokenizer.ggml.tokens"].data)
        ref = np.concatenate(next_token_probs(f16, pieces, n_vocab))
        data = calibration(folder, tmp)
        from qfine.export import imatrix, load_source

        model, tok, _ = load_source(str(folder))
        sequences, where = imatrix.training_sequences(str(folder), tok, str(data))
        importance = imatrix.collect(model, sequences)
        results["imatrix"] = where
        for quant in args.quants.split(","):
            ours, ours_imx = tmp / f"{quant}.gguf", tmp / f"{quant}-imatrix.gguf"
            assert qfine(["export", str(folder), "--quant", quant, "--out", str(ours), "--no-check",
                          "--no-imatrix"]) == 0
            assert qfine(["export", str(folder), "--quant", quant, "--out", str(ours_imx), "--no-check",
                          "--imatrix-data", str(data)]) == 0
            files = {"qfine": ours, "qfine + imatrix": ours_imx}
            for who, imp, k_only in (("llama.cpp", None, True), ("llama.cpp + imatrix (K-quant tensors)", importance,
                                                                 True),
                                     ("llama.cpp + imatrix (every tensor)", importance, False)):
                files[who] = tmp / f"{quant}-{len(files)}.gguf"
                llama_cpp_copy(ours, f16, files[who], lib, imp, k_only)
            row = {}
            for who, path in files.items():
                kl, top1 = kl_top1(ref, np.concatenate(next_token_probs(path, pieces, n_vocab)))
                row[who] = {"kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)), "top1": top1}
                print(f"{quant} {who}: KL to f16 mean {row[who]['kl_mean']:.5f}, p99 {row[who]['kl_p99']:.4f}; "
                      f"top-1 {100 * top1:.2f}%", flush=True)
            results["quants"][quant] = row
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
