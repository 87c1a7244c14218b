"""How much of the 4-bit quantization error LoftQ's starting adapter removes, on a real model.

For each rank: the relative weight error ‖W − Ŵ‖/‖W‖ summed over the adapted layers (Ŵ = dequant(W4),
plus s·BA with LoftQ), and the mean next-token loss on chitchat conversations of the 16-bit model,
the 4-bit model with the default (zero) update, and with the LoftQ update. Prints one JSON line per rank.

    python bench/loftq_error.py --model default --ranks 16,64 --conversations 40
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qfine import LoraSettings, ModelConfig, add_lora, load_model
from qfine.data.chitchat import chitchat_json, conversation_to_messages
from qfine.methods.loftq import loftq_init
from qfine.models.sources import resolve_source
from qfine.models.weights import pristine_reader


def texts(tokenizer, n: int, max_len: int = 256) -> list[torch.Tensor]:
    convs = list(json.loads(chitchat_json().read_text()).values())[9::10][:n]  # qfine's chitchat eval split
    out = []
    for c in convs:
        ids = tokenizer.apply_chat_template(conversation_to_messages(c, max_turns=6), tokenize=True,
                                            return_dict=False)
        out.append(torch.tensor([list(ids)[:max_len]]))
    return out


@torch.no_grad()
def mean_loss(model, batches) -> float:
    losses = [float(model(input_ids=ids, labels=ids).loss) for ids in batches]
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--conversations", type=int, default=40)
    ns = ap.parse_args()
    source = resolve_source(ns.model)
    full = load_model(ModelConfig(source=source, quantization="none", compute_dtype="fp32"))
    batches = texts(full.tokenizer, ns.conversations)
    loss16 = mean_loss(full.model.eval(), batches)
    del full
    for r in [int(x) for x in ns.ranks.split(",")]:
        loaded = load_model(ModelConfig(source=source, compute_dtype="fp32"))
        model = add_lora(loaded.model, LoraSettings(r=r, alpha=2 * r)).eval()
        loss4 = mean_loss(model, batches)
        t0 = time.perf_counter()
        report = loftq_init(model, pristine_reader(source))
        seconds = time.perf_counter() - t0
        print(json.dumps({"rank": r, "layers": report.layers, "weight_error_nf4": round(report.before, 5),
                          "weight_error_loftq": round(report.after, 5), "loss_16bit": round(loss16, 4),
                          "loss_nf4": round(loss4, 4), "loss_nf4_loftq": round(mean_loss(model, batches), 4),
                          "init_seconds": round(seconds, 1), "conversations": len(batches)}), flush=True)
        del model, loaded


if __name__ == "__main__":
    main()
