"""QLoRA training-throughput anchor: qfine vs HF (transformers+bnb+peft) vs Unsloth, plain torch loop.

Copied from ../shared/reference-bench/train_bench.py (the harness behind the peers' numbers) with a
``qfine`` implementation added, so all three are measured by the same loop.

usage: python train_bench.py --impl qfine|hf|unsloth --model DIR --configs 2x2048,1x4096,4x2048
       [--steps 16] [--deadline EPOCH_S] [--out results.jsonl] [--tag 8b]
One process loads the model once, then runs each batch config (bs x seq) for --steps steps on
random token batches (labels = inputs), torch AdamW lr 2e-4 over the LoRA params.
Step time = wall time of fwd+bwd+opt.step+zero_grad with a cuda sync at the end of each step;
median over steps 3..steps-1. Peak memory is measured per config after empty_cache +
reset_peak_memory_stats (so it includes the resident model/optimizer state).
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GiB = 1024 ** 3
DROPOUT = 0.0  # LoRA dropout of every implementation (--dropout)
RANK = 16      # LoRA rank of every implementation (--rank; alpha = 2 × rank)


def load_hf(d, max_seq):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    torch.cuda.synchronize()
    load_s = time.time() - t0
    t1 = time.time()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=DROPOUT, bias="none",
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    model.config.use_cache = False
    torch.cuda.synchronize()
    return model, load_s, time.time() - t1


def load_qfine(d, max_seq, fast=True, ckpt=True, offload=False, resident_gib=0.0, method="lora", variant="lora",
               s2_group=0):
    import torch

    from qfine import LoraSettings, ModelConfig, add_lora, load_model
    from qfine.fast import apply_fast_path, keep_dequantized, offload_checkpoints
    t0 = time.time()
    quant = "int4" if method == "qa-lora" else "nf4"  # QA-LoRA trains over a group-wise INT4 base (groups of 32)
    loaded = load_model(ModelConfig(source=d, quantization=quant, double_quant=True, compute_dtype="bf16",
                                    device="cuda"))
    torch.cuda.synchronize()
    load_s = time.time() - t0
    t1 = time.time()
    model = add_lora(loaded.model, LoraSettings(r=RANK, alpha=2 * RANK, dropout=DROPOUT, target_modules=TARGETS,
                                                method=method, variant=variant),
                     gradient_checkpointing=ckpt)
    if s2_group:
        from qfine.methods import s2attn
        print(f"[qfine] S2-Attn, groups of {s2_group} tokens: {len(s2attn.enable(model, s2_group))} attention modules",
              flush=True)
    if fast:
        print(f"[qfine] {apply_fast_path(model)}", flush=True)
    if offload:
        print(f"[qfine] offloaded checkpoints: {offload_checkpoints(model)} layers", flush=True)
    if fast and resident_gib > 0:
        n, gib = keep_dequantized(model, resident_gib, torch.bfloat16)
        print(f"[qfine] resident weights: {n} layers, {gib:.2f} GiB", flush=True)
    model.train()
    torch.cuda.synchronize()
    return model, load_s, time.time() - t1


def load_unsloth(d, max_seq):
    import torch
    from unsloth import FastLanguageModel
    t0 = time.time()
    model, tok = FastLanguageModel.from_pretrained(d, max_seq_length=max_seq, load_in_4bit=True, dtype=None,
                                                   local_files_only=True)
    torch.cuda.synchronize()
    load_s = time.time() - t0
    t1 = time.time()
    model = FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=2 * RANK, lora_dropout=DROPOUT, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=3407, max_seq_length=max_seq)
    FastLanguageModel.for_training(model)
    torch.cuda.synchronize()
    return model, load_s, time.time() - t1


KERNEL_KINDS = [  # (category, substrings of CUDA kernel names), first match wins
    ("flash attention", ("flash", "fmha", "attention")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
    ("NF4 dequantize", ("dequantize", "kdequant")),
    ("fused elementwise (triton)", ("triton",)),
    ("other elementwise / copies", ("elementwise", "vectorized", "copy", "reduce", "fill", "cat", "index",
                                    "scatter", "gather", "softmax", "memcpy", "memset")),
]


def write_profile(prof, path, tokens, wall_s, cpu_table=False):
    """Per-category and top-kernel CUDA time of one profiled step (the step is not in the timings)."""
    per_kernel = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.device_time_total / 1e3  # ms
    cats = {}
    for name, ms in per_kernel.items():
        low = name.lower()
        cat = next((c for c, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
    total = sum(cats.values())
    lines = [f"one step, {tokens} tokens: {total:.1f} ms of CUDA kernel time in {1e3 * wall_s:.1f} ms wall "
             f"(GPU idle ≥ {max(0.0, 1e3 * wall_s - total):.1f} ms; profiler overhead included)"]
    lines += [f"  {c:<30} {ms:9.1f} ms  {100 * ms / total:5.1f}%" for c, ms in sorted(cats.items(), key=lambda x: -x[1])]
    lines.append("top kernels:")
    for name, ms in sorted(per_kernel.items(), key=lambda x: -x[1])[:25]:
        lines.append(f"  {ms:9.2f} ms  {name[:150]}")
    if cpu_table:  # host-side cost per op: what keeps the GPU waiting when the step is launch-bound
        lines += ["host (CPU) time per op, one step:", prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                                row_limit=45, max_name_column_width=60)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[: 2 + len(cats)]), flush=True)


_SYNC_SEEN = {}


def sync_debug_start(torch):
    """Warn on each synchronising CUDA call and print where it came from (first time per call site)."""
    import traceback as tb
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in tb.extract_stack()[:-1] if "warnings" not in f.filename]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in stack[-6:][::-1])
        if where not in _SYNC_SEEN:
            _SYNC_SEEN[where] = 1
            print(f"SYNC {str(message)[:80]} at {where}", flush=True)

    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")


def sync_debug_stop(torch):
    torch.cuda.set_sync_debug_mode("default")
    print(f"SYNC total call sites: {len(_SYNC_SEEN)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", required=True, choices=["qfine", "hf", "unsloth"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tag", default="")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout for every implementation")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank for every implementation (alpha = 2 × rank)")
    ap.add_argument("--optim", default="adamw_torch", choices=["adamw_torch", "paged_adamw_8bit"],
                    help="optimizer for every implementation")
    ap.add_argument("--configs", default="2x2048")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--deadline", type=float, default=0.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--no-fast-path", action="store_true", help="qfine: the plain peft path")
    ap.add_argument("--no-ckpt", action="store_true",
                    help="qfine: no full-layer recompute (the fused layers keep only GEMM inputs)")
    ap.add_argument("--offload", action="store_true", help="qfine: checkpointed layer inputs in pinned host memory")
    ap.add_argument("--resident-gib", type=float, default=0.0,
                    help="qfine: keep the first layers' weights dequantized within this many GiB")
    ap.add_argument("--profile", default="", help="qfine: write a torch.profiler kernel table of one step here")
    ap.add_argument("--profile-cpu", action="store_true", help="with --profile: also profile host-side ops")
    ap.add_argument("--sync-debug", action="store_true",
                    help="report every host-device synchronisation in step 2 with the Python stack that caused it")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="qfine: capture forward+backward as a CUDA graph per shape (qfine.fast.graphs)")
    ap.add_argument("--method", default="lora", choices=["lora", "qa-lora"],
                    help="qfine: qa-lora trains over a group-wise INT4 base (groups of 32) instead of NF4")
    ap.add_argument("--variant", default="lora", choices=["lora", "dora"], help="qfine: the LoRA variant")
    ap.add_argument("--s2-group", type=int, default=0, help="qfine: LongLoRA S2-Attn over groups of this many tokens")
    ap.add_argument("--autocast", action="store_true",
                    help="wrap forward in torch.autocast(cuda, bf16), as HF Trainer(bf16=True) does")
    a = ap.parse_args()
    global DROPOUT, RANK
    DROPOUT, RANK = a.dropout, a.rank
    if a.impl == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers)
    import torch
    configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",")]
    max_seq = max(s for _, s in configs)
    name = a.impl
    if a.impl == "qfine":
        name += ("_ref" if a.no_fast_path else "_fast") + ("_nockpt" if a.no_ckpt else "") + ("_offload" if a.offload else "") + ("_graph" if a.cuda_graph else "")
        name += f"_res{a.resident_gib:g}" if a.resident_gib > 0 else ""
        name += ("_qalora" if a.method == "qa-lora" else "") + ("_dora" if a.variant == "dora" else "")
        name += f"_s2g{a.s2_group}" if a.s2_group else ""
    base = dict(impl=name + ("_autocast" if a.autocast else ""), tag=a.tag, rank=a.rank, optim=a.optim,
                device=torch.cuda.get_device_name(0))
    import contextlib
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if a.autocast else contextlib.nullcontext

    def emit(rec):
        rec = {**base, **rec}
        print("RESULT " + json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    t_start = time.time()
    try:
        if a.impl == "qfine":
            model, load_s, peft_s = load_qfine(a.model, max_seq, fast=not a.no_fast_path, ckpt=not a.no_ckpt,
                                                 offload=a.offload, resident_gib=a.resident_gib,
                                                 method=a.method, variant=a.variant, s2_group=a.s2_group)
        else:
            model, load_s, peft_s = {"hf": load_hf, "unsloth": load_unsloth}[a.impl](a.model, max_seq)
    except Exception as e:
        traceback.print_exc()
        emit(dict(error=f"load: {type(e).__name__}: {str(e)[:300]}"))
        return 1
    load_peak_alloc = torch.cuda.max_memory_allocated() / GiB
    load_peak_res = torch.cuda.max_memory_reserved() / GiB
    after_load_alloc = torch.cuda.memory_allocated() / GiB
    ntrain = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtypes = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + p.numel()
    print(f"[{a.impl}] load {load_s:.1f}s peft {peft_s:.1f}s alloc {after_load_alloc:.2f}GiB "
          f"trainable {ntrain/1e6:.1f}M frozen dtypes {dtypes}", flush=True)
    probe, hooks = {}, []
    try:
        if a.impl != "hf":
            raise RuntimeError("probe only for hf (hooks would disturb Unsloth's compiled blocks)")
        lay0 = [m for n, m in model.named_modules() if n.endswith("layers.0")][0]
        q0 = [m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj")][0]
        def hk(name):
            def f(mod, inp, out):
                o = out[0] if isinstance(out, tuple) else out
                i = inp[0] if isinstance(inp, tuple) and inp else None
                probe.setdefault(name, f"in {getattr(i, 'dtype', None)} out {getattr(o, 'dtype', None)}")
            return f
        hooks = [lay0.register_forward_hook(hk("layer0")), q0.register_forward_hook(hk("q_proj0"))]
    except Exception as e:
        probe["skipped"] = str(e)[:80]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if a.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(trainable, lr=2e-4)
    else:
        opt = torch.optim.AdamW(trainable, lr=2e-4)
    V = model.config.vocab_size if hasattr(model, "config") else 128256
    g = torch.Generator(device="cuda").manual_seed(1234)
    last_step = last_tokens = None
    out = loss = ids = None
    for bs, seq in configs:
        if a.deadline and last_step is not None:
            est = (a.steps + 2) * last_step * bs * seq / last_tokens + 20
            if time.time() + est > a.deadline:
                emit(dict(bs=bs, seq=seq, skipped=f"deadline (est {est:.0f}s)"))
                continue
        graphed = None
        if a.cuda_graph:
            from qfine.fast.graphs import GraphedStep

            def fwd_bwd(input_ids, labels):
                # autocast's weight-cast cache must be off under capture (PyTorch CUDA-graph notes)
                with (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if a.autocast
                      else contextlib.nullcontext()):
                    step_loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
                step_loss.backward()
                return step_loss.detach()

            graphed = GraphedStep(fwd_bwd, model.parameters(), model=model)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        err = None
        try:
            for step in range(a.steps):
                ids = torch.randint(0, V, (bs, seq), device="cuda", generator=g)
                torch.cuda.synchronize()
                prof = None
                if a.profile and step == a.steps - 1:
                    acts = [torch.profiler.ProfilerActivity.CUDA]
                    if a.profile_cpu:
                        acts.append(torch.profiler.ProfilerActivity.CPU)
                    prof = torch.profiler.profile(activities=acts)
                    prof.__enter__()
                sync_watch = a.sync_debug and step == 2
                if sync_watch:
                    sync_debug_start(torch)
                t0 = time.perf_counter()
                if graphed is not None:
                    loss = graphed(input_ids=ids, labels=ids)
                else:
                    with ctx():
                        out = model(input_ids=ids, labels=ids, use_cache=False)
                        loss = out.loss
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if sync_watch:
                    sync_debug_stop(torch)
                torch.cuda.synchronize()
                if prof is None:
                    times.append(time.perf_counter() - t0)
                else:
                    wall = time.perf_counter() - t0
                    prof.__exit__(None, None, None)
                    write_profile(prof, f"{a.profile}-{a.tag}-{bs}x{seq}.txt", bs * seq, wall, a.profile_cpu)
                losses.append(float(loss.detach()))
                for h in hooks:
                    h.remove()
                hooks = []
        except Exception as e:
            traceback.print_exc()
            err = f"{type(e).__name__}: {str(e)[:300]}"
        rec = dict(bs=bs, seq=seq, steps_done=len(times),
                   load_s=round(load_s, 1), peft_s=round(peft_s, 1),
                   load_peak_alloc_GiB=round(load_peak_alloc, 2), load_peak_res_GiB=round(load_peak_res, 2),
                   peak_alloc_GiB=round(torch.cuda.max_memory_allocated() / GiB, 2),
                   peak_res_GiB=round(torch.cuda.max_memory_reserved() / GiB, 2),
                   step_times=[round(t, 4) for t in times], loss_first=losses[:1], loss_last=losses[-1:])
        if graphed is not None:
            rec["graphs"] = graphed.graphs
            rec["graph_reserved_GiB"] = [round(b / GiB, 2) for b in graphed.capture_reserved]
            from qfine.fast.ops import eager_in_capture
            eager = eager_in_capture()
            if eager:
                rec["eager_in_capture"] = eager
            if graphed.reason:
                rec["graph_off"] = graphed.reason
            graphed.reset()
            graphed = None
        out = loss = ids = None
        opt.zero_grad(set_to_none=True)
        if probe:
            rec["dtype_probe"] = dict(probe)
            probe.clear()
        if err:
            rec["error"] = err
        if len(times) > 4:
            med = statistics.median(times[3:])
            rec.update(step_s=round(med, 4), tok_s=round(bs * seq / med, 1),
                       step_s_min=round(min(times[3:]), 4), step_s_max=round(max(times[3:]), 4))
            last_step, last_tokens = med, bs * seq
        emit(rec)
        del times
    print(f"[{a.impl}] total {time.time()-t_start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
