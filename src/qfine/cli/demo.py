"""``qfine demo``: teach the bundled model one fact; its answers before, after, and after the exact merge."""

from __future__ import annotations

import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from qfine.util.errors import QfineError


def cmd_demo(ns) -> None:
    """Teach the bundled model one fact; show answers before, after, and after merging."""
    from qfine.probe import SEED_FACT, fact_config, seed_experiment

    out = Path(ns.output_dir or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and any(out.iterdir()):
        raise QfineError(f"{out} already exists; choose another --output-dir")
    t0 = time.perf_counter()
    cfg = fact_config(ns.model, out / "data.jsonl", out / "run", ns.steps, ns.learning_rate)
    print("qfine demo — teach one fact with QLoRA, then ask before training, after, and after merging\n")
    print(f"  fact:     {SEED_FACT.question!r} -> {SEED_FACT.reply!r}")
    print(f"  model:    {cfg.model.source} in 4-bit {cfg.model.quantization} (double quant {cfg.model.double_quant})")
    print(f"  LoRA:     r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} on "
          f"{','.join(cfg.lora.target_modules)}")
    print(f"  training: {cfg.train.max_steps} steps, batch {cfg.train.batch_size}, lr {cfg.train.learning_rate} "
          f"{cfg.train.lr_scheduler}, optimizer {cfg.train.optimizer}")
    print(f"  output:   {out}\n", flush=True)
    r = seed_experiment(SEED_FACT, out, source=ns.model, steps=ns.steps, lr=ns.learning_rate,
                        log=lambda s: print(f"  {s}", flush=True))
    knows = r.knows(SEED_FACT)
    print("\ntraining log (loss by logged step): " + ", ".join(f"{x:.4f}" for x in r.losses))
    print(f"\n{'stage':<44} knows '{SEED_FACT.marker}'?")
    rows = [("before training (4-bit base)", "before"), ("after training (4-bit base + adapter)", "after"),
            ("exact merge, bf16, plain transformers", "merged"), ("peft merge_and_unload (requantized 4-bit)",
                                                                   "peft_merged")]
    for label, key in rows:
        print(f"  {label:<42} {'yes' if knows[key] else 'no':<4} {getattr(r, key)[:70]!r}")
    print(f"\nlogits vs the trained model: exact merge {r.merged_rel_diff:.2e}, peft requantized "
          f"{r.peft_rel_diff:.2e} (relative L2)")
    print(f"training took {r.train_seconds:.0f} s; the whole demo {time.perf_counter() - t0:.0f} s")
    if not ns.keep:  # the merged copy of the model and the resume checkpoints are what weigh
        shutil.rmtree(r.merged_dir, ignore_errors=True)
        shutil.rmtree(r.run_dir / "checkpoints", ignore_errors=True)
    kept = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"kept {kept / 2**20:.0f} MiB in {out}" + ("" if ns.keep else " (the adapter and report; --keep keeps the "
                                                       "merged model and checkpoints too)"))
    print(f"try it:  {_command_name()} generate {r.run_dir} --prompt \"{SEED_FACT.question}\"")


def _command_name() -> str:
    """How the user can call qfine again: ``qfine`` when that is on PATH and is this program, else the
    path of this program (``.venv/bin/qfine`` after ``make demo``, whose venv is not activated)."""
    me = Path(sys.argv[0])
    found = shutil.which("qfine")
    if me.name != "qfine" or (found and Path(found).resolve() == me.resolve()):
        return "qfine"
    try:
        return os.path.relpath(me)
    except ValueError:
        return str(me)




def register(sub) -> None:
    """Add demo to the CLI's subparsers."""
    p = sub.add_parser("demo", help="teach the bundled model one fact; compare before/after/merged answers")
    p.add_argument("--model", default="default", help="model source (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--output-dir", help="where the run goes (default: runs/demo-<timestamp>)")
    p.add_argument("--keep", action="store_true", help="keep the merged model and the checkpoints (~300 MiB)")
    p.set_defaults(func=cmd_demo)
