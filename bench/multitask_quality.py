"""Multi-task adapters against one adapter per task and one adapter on the mix, per task, on the bundled model.

Three tasks, each with a train and an eval file:

* facts: 32 made-up capitals, asked and answered. Their eval is the same questions (recall).
* sentiment: `qfine data sentiment` rows as prompt → "positive"/"negative". The eval rows' words
  never occur in training.
* chat: chitchat conversations. The eval split holds other conversations.

Trained with the same rows, rank and learning rate:

(a) one adapter per task, trained alone;
(b) one adapter on the mix of the three;
(c) multi-task: shared r=16 plus one r=8 adapter per task, on the same mix.

By default each run trains one epoch of its rows (batch 4), so every layout sees every row once.
With `--steps N`, the single-task runs train N steps each and the mixes 3N.

Each task's eval perplexity covers the completion tokens only (the training loss mask). One JSON
line per (layout, task), with each layout's trainable parameter count.

    python bench/multitask_quality.py --rows 120 --out /tmp/mt-epoch
    python bench/multitask_quality.py --rows 120 --seed 1 --layouts mix,multitask --out /tmp/mt-seed1

``--seed`` sets train.seed (LoRA initialisation and data order); ``--layouts`` trains and evaluates
only some of the layouts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch

from qfine import config as C
from qfine.data.chitchat import convert
from qfine.data.pipeline import build_dataset
from qfine.data.sentiment import build as build_sentiment
from qfine.generation.load import load_for_inference
from qfine.models.sources import resolve_source
from qfine.training import train

TASKS = ("chat", "facts", "sentiment")
SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "vax", "sel", "dor", "pri", "zen", "ol", "bru", "nai", "quo", "fe", "th"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def write_tasks(out: Path, chat_rows: int) -> dict[str, tuple[Path, Path]]:
    """Each task's (train, eval) JSONL files under ``out``; every row carries its ``task``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    facts = []
    for _ in range(32):
        country, capital = _name(rng, 3), _name(rng, 2)
        facts.append({"messages": [{"role": "user", "content": f"What is the capital of {country}?"},
                                   {"role": "assistant", "content": f"The capital of {country} is {capital}."}]})
    convert(out / "chitchat")
    build_sentiment(out / "sentiment")

    def sentiment(path):
        return [{"prompt": f"Is this review positive or negative?\n{r['text']}", "completion": r["label"]}
                for r in map(json.loads, path.read_text().splitlines())]

    def lines(path, n):
        return [json.loads(x) for x in path.read_text().splitlines()[:n]]

    parts = {"facts": (facts * 4, facts),
             "sentiment": (sentiment(out / "sentiment" / "train.jsonl")[:chat_rows],
                           sentiment(out / "sentiment" / "eval.jsonl")[:200]),
             "chat": (lines(out / "chitchat" / "train.jsonl", chat_rows), lines(out / "chitchat" / "eval.jsonl", 60))}
    files = {}
    for task, (tr, ev) in parts.items():
        paths = out / f"{task}.train.jsonl", out / f"{task}.eval.jsonl"
        for path, rows in zip(paths, (tr, ev)):
            path.write_text("".join(json.dumps({**r, "task": task}) + "\n" for r in rows))
        files[task] = paths
    mixed = [line for t in TASKS for line in files[t][0].read_text().splitlines()]
    random.Random(1).shuffle(mixed)
    (out / "mix.train.jsonl").write_text("\n".join(mixed) + "\n")
    return files


@torch.no_grad()
def task_perplexity(loaded, path: Path, max_len: int) -> float:
    """exp(mean loss over the completion tokens) of the rows in ``path``."""
    ds, _ = build_dataset(str(path), loaded.tokenizer, C.DataConfig(max_seq_len=max_len))
    model = loaded.model.eval()
    total = count = 0.0
    for row in ds:
        ids = torch.tensor([row["input_ids"]], device=model.device)
        labels = torch.tensor([row["labels"]], device=model.device)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    return math.exp(total / count)


def config(source: str, data: Path, out: Path, steps: int, multitask: bool, seed: int = 0) -> C.RunConfig:
    """``steps`` ≤ 0: one epoch."""
    cfg = C.RunConfig(output_dir=str(out))
    cfg.model.source = source
    cfg.data.path, cfg.data.max_seq_len = str(data), 128
    if multitask:
        cfg.data.task_column = "task"
    cfg.lora = C.LoraSettings(r=16, alpha=32, task_r=8 if multitask else 0)
    cfg.train = C.TrainConfig(max_steps=steps if steps > 0 else -1, epochs=1.0, batch_size=4, learning_rate=1e-3,
                              warmup_ratio=0.05, save_steps=10_000, logging_steps=20, report_samples=0, seed=seed)
    return cfg


def trainable(run: Path) -> int:
    """Parameters in every adapter file of a run (a multi-task run: shared and each task's)."""
    from safetensors import safe_open

    total = 0
    for f in (run / "adapter").rglob("adapter_model.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=0,
                    help="steps of each single-task run (the mixes get 3×); 0: one epoch of each run's rows")
    ap.add_argument("--rows", type=int, default=400, help="training rows of chat and of sentiment")
    ap.add_argument("--out", default="/tmp/mt-quality")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs found under --out")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    ap.add_argument("--layouts", default="alone,mix,multitask", help="which of alone, mix, multitask to run")
    ns = ap.parse_args()
    wanted = set(ns.layouts.split(","))
    if not wanted or wanted - {"alone", "mix", "multitask"}:
        ap.error(f"--layouts takes alone, mix and/or multitask, not {ns.layouts}")
    out = Path(ns.out)
    files = write_tasks(out / "data", ns.rows)
    source = resolve_source(ns.model)

    def run(name, data, steps, multitask):
        path = out / name
        if not (ns.reuse and (path / "adapter").is_dir()):
            train(config(source, data, path, steps, multitask, ns.seed), overwrite=True)
        return path

    layouts = {}
    if "alone" in wanted:
        layouts.update({f"alone:{t}": run(f"alone-{t}", files[t][0], ns.steps, False) for t in TASKS})
    if "mix" in wanted:
        layouts["mix"] = run("mix", out / "data" / "mix.train.jsonl", 3 * ns.steps, False)
    if "multitask" in wanted:
        layouts["multitask"] = run("multitask", out / "data" / "mix.train.jsonl", 3 * ns.steps, True)
    from qfine.models.loading import load_model

    base = load_model(C.ModelConfig(source=source))
    for task in TASKS:
        print(json.dumps({"task": task, "layout": "base (NF4), no adapter",
                          "eval_ppl": round(task_perplexity(base, files[task][1], 128), 3), "trainable_params": 0}),
              flush=True)
        for layout, key in (("one adapter per task", f"alone:{task}"), ("one adapter on the mix", "mix"),
                            ("shared + task", "multitask")):
            if key not in layouts:
                continue
            path = layouts[key]
            loaded = load_for_inference(str(path), task=task if layout == "shared + task" else None)
            params = (sum(trainable(layouts[f"alone:{t}"]) for t in TASKS) if layout == "one adapter per task"
                      else trainable(path))
            print(json.dumps({"task": task, "layout": layout, "seed": ns.seed, "eval_ppl": round(task_perplexity(loaded, files[task][1], 128), 3),
                              "trainable_params": params}), flush=True)
            del loaded


if __name__ == "__main__":
    main()
