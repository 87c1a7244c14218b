"""Time and peak host memory of ``qfine export --format gguf`` on an 8B-shaped model (CPU is enough).

Builds Llama-3.1-8B's shapes in 4-bit with LoRA r=16 on all 7 projections (random B), exactly as
``bench/merge_memory.py`` does, then writes the exact merge as one GGUF file per ``--quant`` while a
thread samples the process's resident memory (the bundled model's tokenizer stands in for Llama 3's).

    python bench/export_memory.py --quant q4_k_m q8_0 [--layers 32] [--out /tmp/qfine-8b.gguf]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from merge_memory import PeakSampler, build_adapted_llama, rss_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/qfine-8b.gguf")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--quant", nargs="+", default=["q4_k_m"])
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from qfine.export.gguf_file import write_gguf
    from qfine.models.sources import bundled_gguf_path, gguf_to_folder

    tokenizer = AutoTokenizer.from_pretrained(gguf_to_folder(bundled_gguf_path()))
    t0 = time.perf_counter()
    model = build_adapted_llama(args.layers)
    gib = 2**30
    print(f"8B-shaped ({args.layers} layers) 4-bit model + LoRA built in {time.perf_counter() - t0:.0f} s; "
          f"footprint {model.get_base_model().get_memory_footprint() / gib:.2f} GiB", flush=True)
    for quant in args.quant:
        out = Path(args.out).with_name(f"{Path(args.out).stem}-{quant}.gguf")
        before = rss_bytes()
        sampler = PeakSampler()
        sampler.start()
        report = write_gguf(model, tokenizer, "bench", out, quant)
        sampler.stop()
        size = out.stat().st_size
        print(f"{quant}: {size / gib:.2f} GiB file in {report.seconds:.0f} s; resident before {before / gib:.2f} GiB, "
              f"peak {sampler.peak / gib:.2f} GiB (+{(sampler.peak - before) / gib:.2f}); "
              f"types {report.types()}", flush=True)
        out.unlink()


if __name__ == "__main__":
    main()
