"""``qfine merge`` and ``qfine export``: a trained run as a model folder or a deployment file."""

from __future__ import annotations

from qfine.util.errors import QfineError
from qfine.util.files import writing
from qfine.util.lock import hold

_KEPT = "nothing was left at {out} (it is written under a temporary name and renamed once whole)"


def cmd_merge(ns) -> None:
    """Exact merge of a run's adapter into a 16-bit model folder (optionally requantized)."""
    from qfine.export.merge import merge_run

    with hold(ns.out, "qfine merge"), writing(ns.out, "qfine merge", kept=_KEPT.format(out=ns.out)):
        done = merge_run(ns.run_dir, ns.out, ns.dtype, ns.base, ns.requantize, ns.format, ns.overwrite, ns.task)
    print(f"[qfine] merged model ({done.form}) written to {done.out} in {done.seconds:.1f} s", flush=True)


def cmd_export(ns) -> None:
    """A run or merged folder as a deployment file: GGUF (f16 … q4_k_m) or a bitsandbytes 4-bit folder."""
    if ns.format == "bnb-nf4":
        from qfine.export.merge import merge_run

        with hold(ns.out, "qfine export"), writing(ns.out, "qfine export", kept=_KEPT.format(out=ns.out)):
            done = merge_run(ns.source, ns.out, requantize="nf4", overwrite=ns.overwrite)
        print(f"[qfine] bitsandbytes NF4 folder written to {done.out} in {done.seconds:.1f} s", flush=True)
        return
    if ns.format == "gguf-lora":
        from qfine.export.gguf_lora import export_gguf_lora

        with hold(ns.out, "qfine export"), writing(ns.out, "qfine export", kept=_KEPT.format(out=ns.out)):
            print(f"[qfine] {export_gguf_lora(ns.source, ns.out, ns.overwrite, ns.base_out, ns.quant or 'f16')}",
                  flush=True)
        return
    if ns.base_out:
        raise QfineError("--base-out goes with --format gguf-lora (the base that adapter applies to)")
    from qfine.export import export_gguf

    if not ns.quant:
        raise QfineError("--format gguf needs --quant: f16, bf16, q8_0, q4_0, q4_1, q4_k_m, q5_k_m or q6_k")
    with hold(ns.out, "qfine export"), writing(ns.out, "qfine export", kept=_KEPT.format(out=ns.out)):
        report = export_gguf(ns.source, ns.out, ns.quant, overwrite=ns.overwrite, check=not ns.no_check,
                             verify=ns.verify, verify_data=ns.verify_data, imatrix=not ns.no_imatrix,
                             imatrix_data=ns.imatrix_data)
    print(report.summary())
    print(f"[qfine] report: {ns.out}.report.json", flush=True)


def register(sub) -> None:
    """Add merge and export to the CLI's subparsers."""
    p = sub.add_parser("merge", help="exact merge of a run's adapter into a 16-bit model",
                       description="W = cast(dequant(W4).float() + scaling * B @ A) per adapted layer, written as "
                                   "sharded safetensors that plain transformers loads.")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--out", required=True, help="output folder (written to a temporary sibling, then renamed)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the merged weights")
    p.add_argument("--base", default="dequantized", choices=["dequantized", "pristine"],
                   help="merge onto the dequantized 4-bit weights the adapter was trained against (default), or "
                        "onto the original 16-bit weights (adds the quantization error the adapter never saw)")
    p.add_argument("--requantize", choices=["nf4", "fp4"],
                   help="write a bitsandbytes 4-bit merged model instead (lossy; the logit difference is printed)")
    p.add_argument("--format", default="auto", choices=["auto", "16bit", "int4"],
                   help="int4: keep a QA-LoRA run's base 4-bit, the update folded into its zero points (lossless); "
                        "16bit: dequantize and add (--dtype); auto: int4 for QA-LoRA runs, 16bit otherwise")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--task-adapter", dest="task", metavar="NAME", help="a multi-task run: merge the shared adapter and this task's")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="a run or merged model as GGUF (llama.cpp, Ollama, LM Studio) or bnb 4-bit",
                       description="Merge exactly, then write one GGUF file in-process (no llama.cpp build) with a "
                                   "report of every tensor's type and error and the file's logits read back.")
    p.add_argument("source", help="a finished run directory, or a model folder (e.g. a qfine merge output)")
    p.add_argument("--format", choices=["gguf", "gguf-lora", "bnb-nf4"], default="gguf",
                   help="gguf: the merged model; gguf-lora: the run's adapter alone, for llama.cpp's --lora over a "
                        "base GGUF; bnb-nf4: a bitsandbytes 4-bit folder")
    p.add_argument("--base-out", help="with --format gguf-lora: also write the base the adapter was trained on "
                                      "(the dequantized 4-bit weights) as FILE.gguf, of type --quant (default f16)")
    p.add_argument("--quant", choices=["f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"],
                   help="GGUF file type (K-quant mixes as llama.cpp's: attn_v/ffn_down of some layers and the "
                        "output at 6 bits)")
    p.add_argument("--out", required=True, help="FILE.gguf (or a folder for bnb-nf4); written to a temporary "
                                                "sibling and renamed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-check", action="store_true", help="skip reading the file back to compare logits")
    p.add_argument("--verify", action="store_true",
                   help="score the GGUF in llama.cpp against the merged model: token ids on 36 strings, KL and top-1 "
                        "agreement of next-token distributions on the run's eval rows (needs `make llamacpp`)")
    p.add_argument("--verify-data", metavar="FILE", help="with --verify: score on these rows instead")
    p.add_argument("--imatrix-data", metavar="FILE",
                   help="q4_0 … q6_k: the rows the importance matrix is collected on (default: a run's training rows)")
    p.add_argument("--no-imatrix", action="store_true",
                   help="q4_0 … q6_k: no importance matrix (by default one from the training rows is used for "
                        "each tensor where it lowers the importance-weighted error)")
    p.set_defaults(func=cmd_export)
