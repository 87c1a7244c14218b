"""QA-LoRA's 4-bit merge against QLoRA + requantize at the same bits, on real chitchat data.

Trains the bundled model (or --model) twice with the same data, steps and rank: QLoRA (NF4 + double
quant) and QA-LoRA (INT4, groups of 32). Then scores the perplexity of the chitchat eval split
(mean next-token loss over whole conversations) of: each base, each trained model, QLoRA's exact
16-bit merge, that merge requantized to NF4 (bitsandbytes) and to INT4-g32 (the QA-LoRA layout,
round to nearest), and QA-LoRA's 4-bit merge. One JSON line per row; bits per weight of the
projections as stored.

    python bench/qalora_quality.py --steps 60 --out /tmp/qa-quality
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from qfine import config as C
from qfine.data.chitchat import convert
from qfine.export.merge import requantize_folder, save_merged
from qfine.generation.load import load_for_inference
from qfine.models.loading import load_model
from qfine.models.sources import resolve_source
from qfine.quant.int4 import quantize_model
from qfine.training import train


def eval_batches(tokenizer, path: Path, n: int, max_len: int) -> list[torch.Tensor]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [torch.tensor([list(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False))[:max_len]])
            for r in rows]


@torch.no_grad()
def perplexity(model, batches) -> float:
    model.eval()
    total = count = 0.0
    for ids in batches:
        ids = ids.to(model.device)
        n = ids.shape[1] - 1
        total += float(model(input_ids=ids, labels=ids).loss) * n
        count += n
    return math.exp(total / count)


def run_config(source: str, data: Path, out: Path, steps: int, method: str) -> C.RunConfig:
    cfg = C.RunConfig(output_dir=str(out))
    cfg.model.source = source
    cfg.data.path, cfg.data.max_seq_len = str(data / "train.jsonl"), 256
    cfg.lora = C.LoraSettings(r=16, alpha=32, method=method)
    cfg.train = C.TrainConfig(max_steps=steps, batch_size=4, learning_rate=2e-4, warmup_ratio=0.05, save_steps=steps,
                              logging_steps=10, report_samples=0, seed=0)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-conversations", type=int, default=60)
    ap.add_argument("--out", default="/tmp/qa-quality")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs found under --out")
    ns = ap.parse_args()
    out = Path(ns.out)
    data = out / "data"
    convert(data)
    source = resolve_source(ns.model)
    base16 = load_model(source, quantization="none", compute_dtype="fp32")
    batches = eval_batches(base16.tokenizer, data / "eval.jsonl", ns.eval_conversations, 512)

    def row(name: str, model, bits: float, **extra):
        print(json.dumps({"model": name, "bits_per_weight": bits, "eval_ppl": round(perplexity(model, batches), 3),
                          **extra}), flush=True)

    row("16-bit base", base16.model, 16)
    del base16
    for q, bits in (("nf4", 4.127), ("int4", 6.0)):
        row(f"{q} base", load_model(source, quantization=q, compute_dtype="fp32").model, bits)
    runs = {}
    for method in ("lora", "qa-lora"):
        if ns.reuse and (out / method / "adapter" / "adapter_config.json").is_file():
            runs[method] = out / method  # a finished run of an earlier call with the same settings
            continue
        t0 = time.perf_counter()
        runs[method] = train(run_config(source, data, out / method, ns.steps, method), overwrite=True)
        print(json.dumps({"trained": method, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    qlora = load_for_inference(str(runs["lora"]))
    row("QLoRA: 4-bit NF4 base + adapter (as trained)", qlora.model, 4.127)
    m16 = save_merged(qlora.model, qlora.tokenizer, out / "qlora-merged16", "fp32", overwrite=True)
    del qlora
    plain = load_model(str(m16), quantization="none", compute_dtype="fp32").model
    row("QLoRA merged exactly to 16-bit", plain, 16)
    quantize_model(plain, 32)
    row("QLoRA merged, requantized to INT4-g32 (round to nearest)", plain, 6.0)
    del plain
    nf4 = requantize_folder(m16, out / "qlora-nf4", "nf4", overwrite=True)
    row("QLoRA merged, requantized to NF4 (bitsandbytes)", load_model(str(nf4), compute_dtype="fp32").model, 4.127)
    qa = load_for_inference(str(runs["qa-lora"]))
    row("QA-LoRA: INT4-g32 base + adapter (as trained)", qa.model, 6.0)
    m4 = save_merged(qa.model, qa.tokenizer, out / "qalora-merged4", "fp32", overwrite=True, int4=True)
    row("QA-LoRA merged, still INT4-g32 (codes unchanged)", load_model(str(m4), compute_dtype="fp32").model, 6.0)


if __name__ == "__main__":
    main()
