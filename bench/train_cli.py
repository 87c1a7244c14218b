"""End-to-end `qfine train` throughput: the CLI's own trainer (TRL + qfine's step), not the bench loop.

usage: python bench/train_cli.py --model DIR --bs 2 --seq 2048 --steps 24 [--no-cuda-graphs] [--no-fast-path] [--ckpt]
       [--offload] [--packing] [--out RESULTS.jsonl] [--host-profile N]

Writes text rows of random words longer than --seq (each is truncated to exactly --seq tokens, so every
batch is bs×seq), trains NF4 + double quant, LoRA r=16 on all seven projections, dropout 0, bf16,
through ``qfine.training.train`` (what ``qfine train`` runs), and prints one JSON line: median tokens/s
over the logged steps after the first five (warm-up, compile, capture), peak allocated GiB as logged,
first and last loss, and the CUDA-graph summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _host_profile_callback():
    from transformers import TrainerCallback

    class HostProfile(TrainerCallback):
        """cProfile over the steady-state optimizer steps ``first``..``last`` only (no load, compile, capture)."""

        def __init__(self, first: int, last: int):
            import cProfile

            self.first, self.last, self.profiler = first, last, cProfile.Profile()

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.first:
                self.profiler.enable()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.last:
                self.profiler.disable()

    return HostProfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--no-fast-path", action="store_true", help="the plain peft layers (reference path)")
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--offload", action="store_true", help="checkpointed inputs in pinned host memory")
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--out", default=None, help="append the JSON line here too")
    ap.add_argument("--host-profile", type=int, default=0, metavar="N",
                    help="run under cProfile and print the N functions with the most own host time")
    a = ap.parse_args()

    from qfine import RunConfig
    from qfine.config import LoraSettings
    from qfine.training import train

    HostProfile = _host_profile_callback()

    tmp = Path(tempfile.mkdtemp(prefix="qfine_cli_bench_"))
    rng = random.Random(0)
    rows = a.bs * (a.steps + 2)
    with (tmp / "data.jsonl").open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(4, 1000)}" for _ in range(a.seq + 64))}) + "\n")
    cfg = RunConfig(output_dir=str(tmp / "run"))
    cfg.model.source = a.model
    cfg.model.quantization, cfg.model.double_quant = "nf4", True
    cfg.lora = LoraSettings(r=16, alpha=16, dropout=0.0, target_modules=["all-linear"])
    cfg.data.path, cfg.data.max_seq_len, cfg.data.packing = str(tmp / "data.jsonl"), a.seq, a.packing
    t = cfg.train
    t.max_steps, t.batch_size, t.grad_accum, t.learning_rate = a.steps, a.bs, 1, 2e-4
    t.lr_scheduler, t.logging_steps, t.save_steps, t.report_samples = "constant", 1, 10**6, 0
    t.gradient_checkpointing, t.offload_checkpoints = a.ckpt, a.offload
    t.cuda_graphs, t.fast_path = not a.no_cuda_graphs, not a.no_fast_path
    printed = io.StringIO()
    start = time.time()
    callbacks = [HostProfile(first=6, last=min(a.steps - 1, 16))] if a.host_profile else []
    with contextlib.redirect_stdout(printed):
        run = train(cfg, callbacks=callbacks)
    wall = time.time() - start
    if callbacks:
        import pstats

        print(f"host profile of optimizer steps {callbacks[0].first}..{callbacks[0].last}:")
        pstats.Stats(callbacks[0].profiler).sort_stats("tottime").print_stats(a.host_profile)
    lines = printed.getvalue().splitlines()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "tokens_per_s" in m]
    rates = [m["tokens_per_s"] for m in steps[5:]]
    result = dict(
        bench="qfine-train-cli", model=Path(a.model).name, bs=a.bs, seq=a.seq, steps=a.steps,
        fast_path=t.fast_path, cuda_graphs=t.cuda_graphs, ckpt=a.ckpt, offload=a.offload, packing=a.packing,
        tok_s=round(statistics.median(rates), 1) if rates else None,
        peak_alloc_gib=max((m.get("peak_gpu_mem_gib", 0) for m in steps), default=None),
        loss_first=steps[0]["loss"] if steps else None, loss_last=steps[-1]["loss"] if steps else None,
        wall_s=round(wall, 1), qfine_lines=[x for x in lines if x.startswith("[qfine]")],
    )
    print(json.dumps(result))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
