"""End-to-end `qfine train` throughput: the CLI's own trainer (TRL + qfine's step), not the bench loop.

usage: python bench/train_cli.py --model DIR --bs 2 --seq 2048 --steps 24 [--no-cuda-graphs]
       [--no-fast-path] [--ckpt] [--offload] [--packing] [--logging-steps N] [--out RESULTS.jsonl]
       [--host-profile N] [--gpu-profile [--profile-stack]] [--sync-debug]

Writes text rows of random words longer than --seq (each is truncated to exactly --seq tokens, so every
batch is bs×seq), trains NF4 + double quant, LoRA r=16 on all seven projections, dropout 0, bf16 (flags change these),
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


def _kernel_kind(name: str) -> str:
    """A coarse class of a CUDA kernel by its name, for the per-step time split."""
    low = name.lower()
    if "sdpa" in low or "flash" in low or "fmha" in low or "attention" in low:
        return "attention"
    if "nvjet" in low or "gemm" in low or "cutlass" in low or "xmma" in low:
        return "gemm"
    if "_nf4_kernel" in low or "dequantize" in low:
        return "nf4 dequantize"
    if low.startswith("triton_") or low.startswith("_"):  # inductor's fused kernels, qfine's own Triton ones
        return "fused elementwise (triton)"
    if "multi_tensor_apply" in low:
        return "optimizer"
    if "memcpy" in low or "memset" in low:
        return "copies"
    return "other torch kernels"


def _gpu_profile_callback():
    from transformers import TrainerCallback

    class GpuProfile(TrainerCallback):
        """torch.profiler over optimizer steps ``first``..``last``: how much of the wall time the GPU
        was busy, its longest idle gaps, and the kernels that took the most GPU time."""

        def __init__(self, first: int, last: int, stack: bool = False):
            self.first, self.last, self.prof, self.stack = first, last, None, stack

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.first:
                import torch

                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                # with_stack: Python frames appear as host events, so an idle gap names what the host did
                self.prof = torch.profiler.profile(activities=acts, with_stack=self.stack)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.last and self.prof is not None:
                import torch

                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)

        def report(self, top: int = 16) -> dict:
            from torch.autograd import DeviceType

            kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in self.prof.events()
                             if e.device_type == DeviceType.CUDA)
            busy, gaps, end = 0.0, [], None
            for s, e, name in kernels:
                if end is not None and s > end:
                    gaps.append((s - end, end, name))
                busy += max(0.0, e - max(s, end if end is not None else s))
                end = e if end is None else max(end, e)
            span = end - kernels[0][0]
            steps = self.last - self.first
            by_kernel = {}
            for s, e, name in kernels:
                by_kernel[name] = by_kernel.get(name, 0.0) + (e - s)
            gaps.sort(reverse=True)
            kinds = {}
            for name, t in by_kernel.items():
                kinds[_kernel_kind(name)] = kinds.get(_kernel_kind(name), 0.0) + t
            out = dict(steps=steps, wall_ms_per_step=round(span / steps / 1e3, 2),
                       kernels_ms_per_step_by_kind={k: round(t / steps / 1e3, 2) for k, t in
                                                    sorted(kinds.items(), key=lambda kv: -kv[1])},
                       gpu_busy_ms_per_step=round(busy / steps / 1e3, 2),
                       idle_gaps_ms_top=[(round(g / 1e3, 2), n[:60]) for g, _, n in gaps[:top]],
                       kernels_ms_per_step_top=[(round(t / steps / 1e3, 2), n[:80]) for n, t in
                                                sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]])
            if self.stack:  # the host events spanning most of each of the longest gaps, innermost first
                host = [(e.time_range.start, e.time_range.end, e.name) for e in self.prof.events()
                        if e.device_type == DeviceType.CPU]
                out["idle_gaps_host"] = []
                for g, g0, _ in gaps[:6]:
                    cover = sorted((e - s, n) for s, e, n in host if min(e, g0 + g) - max(s, g0) > 0.5 * g)
                    out["idle_gaps_host"].append((round(g / 1e3, 2), [(round(d / 1e3, 2), n[:70]) for d, n in cover[:8]]))
            return out

    return GpuProfile


def _sync_debug_callback():
    from transformers import TrainerCallback

    class SyncDebug(TrainerCallback):
        """Every host↔GPU synchronisation during optimizer steps ``first``..``last``, with the caller
        (torch's sync debug mode, warnings recorded with their Python stack)."""

        def __init__(self, first: int, last: int):
            self.first, self.last, self.seen, self._old = first, last, {}, None

        def _record(self, message, category, filename, lineno, file=None, line=None):
            import traceback

            frames = [f for f in traceback.extract_stack()[:-1] if "site-packages/torch/" not in f.filename
                      and "warnings" not in f.filename][-4:]
            key = " <- ".join(f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in reversed(frames))
            self.seen[key] = self.seen.get(key, 0) + 1

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.first:
                import warnings

                import torch

                self._old = warnings.showwarning
                warnings.showwarning = self._record
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.last and self._old is not None:
                import warnings

                import torch

                torch.cuda.set_sync_debug_mode(0)
                warnings.showwarning = self._old

        def report(self) -> dict:
            steps = self.last - self.first
            return {k: round(n / steps, 2) for k, n in sorted(self.seen.items(), key=lambda kv: -kv[1])}

    return SyncDebug


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
    ap.add_argument("--logging-steps", type=int, default=1, help="log (and so sync with the GPU) every N steps")
    ap.add_argument("--resident-gib", type=float, default=0.0, help="train.resident_weights_gib")
    ap.add_argument("--optim", default=None, help="train.optimizer (default: qfine's)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"],
                    help="train.precision (model.compute_dtype follows)")
    ap.add_argument("--dropout", type=float, default=0.0, help="lora.dropout")
    ap.add_argument("--targets", default="all-linear", help="lora.target_modules, comma-separated")
    ap.add_argument("--alpha", type=int, default=16, help="lora.alpha (r is 16)")
    ap.add_argument("--grad-accum", type=int, default=1, help="train.grad_accum")
    ap.add_argument("--gpu-memory-gib", type=float, default=0.0,
                    help="cap this process at this much GPU memory (torch.cuda.set_per_process_memory_fraction)")
    ap.add_argument("--out", default=None, help="append the JSON line here too")
    ap.add_argument("--gpu-profile", action="store_true",
                    help="torch.profiler over steady-state steps: GPU busy vs wall time, idle gaps, top kernels")
    ap.add_argument("--profile-stack", action="store_true",
                    help="with --gpu-profile: record Python frames and name the host work under the longest idle gaps")
    ap.add_argument("--sync-debug", action="store_true",
                    help="count host-GPU syncs per steady-state step, by caller")
    ap.add_argument("--host-profile", type=int, default=0, metavar="N",
                    help="run under cProfile and print the N functions with the most own host time")
    a = ap.parse_args()

    if a.gpu_memory_gib:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(a.gpu_memory_gib * 2**30 / total)
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
    cfg.lora = LoraSettings(r=16, alpha=a.alpha, dropout=a.dropout, target_modules=a.targets.split(","))
    cfg.model.compute_dtype = a.precision
    cfg.data.path, cfg.data.max_seq_len, cfg.data.packing = str(tmp / "data.jsonl"), a.seq, a.packing
    t = cfg.train
    t.max_steps, t.batch_size, t.grad_accum, t.learning_rate = a.steps, a.bs, a.grad_accum, 2e-4
    t.precision = a.precision
    t.lr_scheduler, t.logging_steps, t.save_steps, t.report_samples = "constant", a.logging_steps, 10**6, 0
    t.gradient_checkpointing, t.offload_checkpoints = a.ckpt, a.offload
    t.cuda_graphs, t.fast_path = not a.no_cuda_graphs, not a.no_fast_path
    if a.optim:
        t.optimizer = a.optim
    t.resident_weights_gib = a.resident_gib
    printed = io.StringIO()
    start = time.time()
    callbacks = [HostProfile(first=6, last=min(a.steps - 1, 16))] if a.host_profile else []
    if a.gpu_profile:
        callbacks.append(_gpu_profile_callback()(first=8, last=min(a.steps - 1, 12), stack=a.profile_stack))
    sync = _sync_debug_callback()(first=8, last=min(a.steps - 1, 12)) if a.sync_debug else None
    callbacks += [sync] if sync else []
    with contextlib.redirect_stdout(printed):
        run = train(cfg, callbacks=callbacks)
    wall = time.time() - start
    syncs = callbacks.pop().report() if sync else None
    gpu_profile = callbacks.pop().report() if a.gpu_profile else None
    if callbacks:
        import pstats

        print(f"host profile of optimizer steps {callbacks[0].first}..{callbacks[0].last}:")
        pstats.Stats(callbacks[0].profiler).sort_stats("tottime").print_stats(a.host_profile)
    lines = printed.getvalue().splitlines()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "tokens_per_s" in m]
    # logs whose window starts after step 5 (warm-up, compile, capture)
    rates = [m["tokens_per_s"] for m in steps if m["step"] - a.logging_steps >= 5]
    result = dict(
        bench="qfine-train-cli", model=Path(a.model).name, bs=a.bs, seq=a.seq, steps=a.steps,
        precision=a.precision, dropout=a.dropout, targets=a.targets, grad_accum=a.grad_accum,
        logging_steps=a.logging_steps, optimizer=t.optimizer, resident_weights_gib=a.resident_gib,
        fast_path=t.fast_path, cuda_graphs=t.cuda_graphs, ckpt=a.ckpt, offload=a.offload, packing=a.packing,
        tok_s=round(statistics.median(rates), 1) if rates else None,
        peak_alloc_gib=max((m.get("peak_gpu_mem_gib", 0) for m in steps), default=None),
        loss_first=steps[0]["loss"] if steps else None, loss_last=steps[-1]["loss"] if steps else None,
        wall_s=round(wall, 1), gpu_profile=gpu_profile, syncs_per_step=syncs, qfine_lines=[x for x in lines if x.startswith("[qfine]")],
    )
    print(json.dumps(result))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
