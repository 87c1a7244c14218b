"""Adaptive 4/8-bit quantization against all-NF4, all-int8, 16-bit and random layer choices.

Perplexity of the chitchat eval split (first N conversations, whole-sequence next-token loss) of the
bundled model (or --model) loaded: in 16 bits, all-int8, all-NF4, adaptive at each budget
(calibrated on the first 16 rows of the chitchat training split, as `qfine train` does), and with
random int8 layer sets of the same extra memory (several seeds). One JSON line per row.

    python bench/adaptive_quality.py --budgets 1.10x,1.25x --random-seeds 3
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from qalora_quality import eval_batches, perplexity

from qfine import config as C
from qfine.data.chitchat import convert
from qfine.memory.plan import weight_bytes
from qfine.models.loading import load_model
from qfine.models.sources import resolve_source
from qfine.quant.adaptive import extra_int8_bytes
from qfine.training.decide import select


def calibration(tokenizer, data: Path) -> list[torch.Tensor]:
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:16]]
    return [torch.tensor([list(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False))[:512]])
            for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--budgets", default="1.10x,1.25x")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--eval-conversations", type=int, default=60)
    ap.add_argument("--no-bases", action="store_true", help="skip the 16-bit, all-int8 and all-NF4 rows")
    ap.add_argument("--out", default="/tmp/adaptive-quality")
    ns = ap.parse_args()
    data = Path(ns.out) / "data"
    convert(data)
    source = resolve_source(ns.model)

    def row(name, cfg: C.ModelConfig, base: bool = False, **extra):
        loaded = load_model(cfg)
        if base and ns.no_bases:
            return loaded
        batches = eval_batches(loaded.tokenizer, data / "eval.jsonl", ns.eval_conversations, 512)
        print(json.dumps({"model": name, "eval_ppl": round(perplexity(loaded.model, batches), 3), **extra}), flush=True)
        return loaded

    full = row("16-bit", C.ModelConfig(source=source, compute_dtype="fp32", quantization="none"), base=True)
    all_nf4 = weight_bytes(full.model.config, "nf4", True)
    linears = {n: m for n, m in full.model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    sizes = {n: (m.weight.numel(), m.out_features) for n, m in linears.items()}
    calib = calibration(full.tokenizer, data)
    del full, linears
    if not ns.no_bases:
        row("all-int8", C.ModelConfig(source=source, compute_dtype="fp32", quantization="adaptive",
                                      int8_modules=list(sizes)), weight_ratio=round(
            (all_nf4 + sum(extra_int8_bytes(*s) for s in sizes.values())) / all_nf4, 3))
        row("all-NF4", C.ModelConfig(source=source, compute_dtype="fp32", quantization="nf4"), weight_ratio=1.0)
    for budget in ns.budgets.split(","):
        cfg = C.ModelConfig(source=source, compute_dtype="fp32", quantization="adaptive", memory_budget=budget)
        chosen, layers, line = select(cfg, calib)
        spent = sum(extra_int8_bytes(*sizes[n]) for n in chosen)
        cfg.int8_modules = chosen
        row(f"adaptive {budget}", cfg, int8_layers=len(chosen), weight_ratio=round((all_nf4 + spent) / all_nf4, 3))
        for seed in range(ns.random_seeds):
            rng = random.Random(seed)
            order = list(sizes)
            rng.shuffle(order)
            pick, used = [], 0.0
            for n in order:  # random layers until the same extra memory is spent
                cost = extra_int8_bytes(*sizes[n])
                if used + cost <= spent:
                    pick.append(n)
                    used += cost
            row(f"random at {budget}, seed {seed}", C.ModelConfig(source=source, compute_dtype="fp32",
                                                                  quantization="adaptive", int8_modules=pick),
                int8_layers=len(pick), weight_ratio=round((all_nf4 + used) / all_nf4, 3))


if __name__ == "__main__":
    main()
