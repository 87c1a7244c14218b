"""A large model on one GPU: tok/s and peak memory with the weights resident, streamed, and under
per-process memory caps, each next to what ``qfine plan``'s memory model predicts from config.json.

    python bench/big_model.py --model /dev/shm/m_70b --rank 64 --optim paged_adamw_8bit --dropout 0.05 \\
        --phases "resident:1x2048,1x8192;stream:1x2048;stream@48:1x2048,1x8192;stream@24:1x2048,1x8192" \\
        --offload --steps 5 --out results.jsonl

One process loads the model once (on the GPU, uncapped; or on the CPU with ``--stage-on-cpu``, as
``qfine train`` does when it streams), runs the ``resident`` configs, then moves the decoder layers'
weights to pinned host memory (``qfine.fast.stream``) for the ``stream`` phases;
``stream@24`` caps the process at 24 GiB with ``torch.cuda.set_per_process_memory_fraction``. A
config that runs out of memory is recorded as such. Prints one ``RESULT {json}`` line per config and
a table (predicted vs measured peak) at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GiB = 2**30


def predicted(config, rank: int, optim: str, tokens: int, mode: str, streamed: bool, keep: int = 0) -> float:
    """qfine plan's peak (GiB) for this step, from the config alone (``keep``: streamed, layers kept on
    the GPU)."""
    from qfine import config as C
    from qfine.memory import estimate as memory
    from qfine.memory import plan

    cfg = C.RunConfig()
    cfg.lora.r, cfg.lora.target_modules, cfg.train.optimizer = rank, TARGETS, optim
    est = memory.estimate(memory.Shapes.from_config(config), tokens, mode, plan.weight_bytes(config, "nf4"),
                          plan.trainable_params(config, cfg), optim, True, dropout=True,
                          layer_bytes=plan.layer_bytes(config, "nf4") if streamed else 0)
    return (est.total + keep * plan.layer_bytes(config, "nf4")) / GiB


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--optim", default="paged_adamw_8bit", choices=["paged_adamw_8bit", "adamw_torch"])
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--phases", default="resident:1x2048;stream:1x2048;stream@24:1x2048")
    ap.add_argument("--offload", action="store_true", help="checkpointed layer inputs in pinned host memory")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--keep-last", default="0", help="stream phases: last layers kept on the GPU, per phase "
                    "in order (a comma list; the last value serves the rest)")
    ap.add_argument("--deadline", type=float, default=0.0, help="unix time after which no config starts")
    ap.add_argument("--out", default="")
    ap.add_argument("--stage-on-cpu", action="store_true",
                    help="load onto the CPU and place on the GPU when the first stream phase starts, as qfine "
                    "train does when it streams (no resident phase then)")
    a = ap.parse_args()
    if a.stage_on_cpu and not a.phases.startswith("stream"):
        ap.error("--stage-on-cpu: the phases must start with a stream phase")

    import torch

    from qfine import LoraSettings, ModelConfig, add_lora, load_model
    from qfine.fast import apply_fast_path, offload_checkpoints
    from qfine.fast.stream import install

    t0 = time.time()
    loaded = load_model(ModelConfig(source=a.model, quantization="nf4", compute_dtype="bf16", device="cuda"),
                        stage_on_cpu=a.stage_on_cpu)
    torch.cuda.synchronize()
    load_s = time.time() - t0
    model = add_lora(loaded.model, LoraSettings(r=a.rank, alpha=2 * a.rank, dropout=a.dropout, target_modules=TARGETS),
                     gradient_checkpointing=True)
    print(f"[bench] load {load_s:.1f}s, {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated; {apply_fast_path(model)}",
          flush=True)
    if a.offload:
        offload_checkpoints(model)
    model.train()
    mode = "offload" if a.offload else "checkpoint"
    params = [p for p in model.parameters() if p.requires_grad]
    if a.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4)
    config, vocab = model.config, model.config.vocab_size
    total = torch.cuda.mem_get_info()[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    stream, rows = None, []
    keeps = [int(k) for k in a.keep_last.split(",")]
    for phase in a.phases.split(";"):
        name, configs = phase.split(":")
        kind, _, cap = name.partition("@")
        if kind == "stream":
            keep = keeps.pop(0) if len(keeps) > 1 else keeps[0]
            if stream is not None and keep != len(stream.layers) - sum(1 for s in stream.slots if s):
                torch.cuda.set_per_process_memory_fraction(1.0)  # every weight comes back first
                stream.remove()
                stream = None
        if kind == "stream" and stream is None:
            t1 = time.time()
            stream = install(model, "cuda", keep_last=keep)
            print(f"[bench] streaming {stream.streamed_bytes / GiB:.2f} GiB of {len(stream.layers)} layers "
                  f"(install {time.time() - t1:.1f}s), {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated",
                  flush=True)
        torch.cuda.set_per_process_memory_fraction(float(cap) * GiB / total if cap else 1.0)
        for c in configs.split(","):
            bs, seq = (int(x) for x in c.split("x"))
            label = name + (f" keep {keep}" if kind == "stream" and keep else "")
            rec = dict(phase=label, bs=bs, seq=seq, rank=a.rank, optim=a.optim, mode=mode, load_s=round(load_s, 1),
                       plan_GiB=round(predicted(config, a.rank, a.optim, bs * seq, mode, stream is not None,
                                                keep if kind == "stream" else 0), 2))
            if a.deadline and time.time() > a.deadline:
                rec["skipped"] = "deadline"
                rows.append(rec)
                print("RESULT " + json.dumps(rec), flush=True)
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            fetches = stream.fetches if stream is not None else 0
            try:
                for _ in range(a.steps):
                    ids = torch.randint(0, vocab, (bs, seq), device="cuda", generator=g)
                    torch.cuda.synchronize()
                    s0 = time.perf_counter()
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - s0)
                    losses.append(float(loss.detach()))
                    if a.deadline and time.time() > a.deadline:
                        break
            except torch.OutOfMemoryError as e:
                rec["error"] = f"out of memory: {str(e).splitlines()[0][:160]}"
            loss = None
            opt.zero_grad(set_to_none=True)
            rec.update(steps=len(times), step_times=[round(t, 3) for t in times], loss=losses[-1:],
                       peak_alloc_GiB=round(torch.cuda.max_memory_allocated() / GiB, 2),
                       peak_res_GiB=round(torch.cuda.max_memory_reserved() / GiB, 2))
            if stream is not None:
                rec["fetches_per_step"] = (stream.fetches - fetches) / max(1, len(times))
            if len(times) >= 2:
                med = statistics.median(times[1:])
                rec.update(step_s=round(med, 3), tok_s=round(bs * seq / med, 1))
            elif times and "error" not in rec:
                # one step (a long sequence): its time includes compiling, which is small beside the step
                rec.update(step_s=round(times[0], 3), tok_s=round(bs * seq / times[0], 1), timing="first step")
            rows.append(rec)
            print("RESULT " + json.dumps(rec), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    torch.cuda.set_per_process_memory_fraction(1.0)
    print("\n| phase | batch × seq | tok/s | peak allocated GiB | peak reserved GiB | plan GiB | plan / measured |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = r.get("peak_alloc_GiB")
        ratio = f"{r['plan_GiB'] / peak:.3f}" if peak and "error" not in r and r.get("steps") else "–"
        what = r.get("tok_s", r.get("error", r.get("skipped", "–")))
        print(f"| {r['phase']} | {r['bs']}×{r['seq']} | {what} | {peak} | {r.get('peak_res_GiB')} | {r['plan_GiB']} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
