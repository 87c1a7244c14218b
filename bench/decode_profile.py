"""Where the engine's decode step spends its time, and launch settings for the 4-bit small-row kernel.

usage: python bench/decode_profile.py --model DIR [--rows 1 16] [--length 384] [--tune]

Loads DIR as bench/generate_bench.py does (``load_bench_model``), then:

* ``--tune``: for each distinct projection shape of the first layer and each row count, the times that
  :func:`qfine.fast.gemv_kernel.matmul_4bit` measured for its candidate launch settings (and
  bitsandbytes' own paths) when it chose one, and the weight bytes each reads per second; beside them
  bitsandbytes' layer alone (no adapter), replayed the same way, and the LoRA down-products (one launch
  against a cast and a cuBLAS product per projection);
* for each row count: the decode step as a replayed CUDA graph (ms per step, median of 5 × 20 replays),
  and one un-graphed step under torch.profiler: the kernel count and the 25 kernels with the most time.

One JSON line per measurement (``RESULT {...}``), the profiler tables as text.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from generate_bench import load_bench_model, param_bytes, step_bytes


def tune(model, rows_list):
    from qfine.fast import gemv_kernel as G
    from qfine.fast.lora import describe_proj
    from qfine.fast.swap import causal_lm

    layer = causal_lm(model).model.layers[0]
    seen = {}
    for parent, name in [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj")]:
        got = describe_proj(getattr(getattr(layer, parent), name))
        seen[name] = got
    for name, got in seen.items():
        w = got.base.weight
        n, k = w.quant_state.shape
        nbytes = param_bytes(w)
        for rows in rows_list:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            xa = torch.randn(rows, 16, device="cuda")
            lora = (xa, got.lora_b, got.scale)
            G.matmul_4bit(x, w, lora)  # times the candidates for this shape (G.TUNED)
            tile = 1 if rows == 1 else max(16, 1 << (rows - 1).bit_length())  # the timing's row bucket
            key = next(key for key in G.TUNED if key[1:4] == (tile, n, k) and key[-1])
            for t, cfg in G.TUNED[key]:
                print("RESULT " + json.dumps({"what": "tune", "proj": name, "n": n, "k": k, "rows": rows,
                                              "config": cfg, "us": round(t * 1e6, 2),
                                              "gbs": round(nbytes / t / 1e9, 1)}), flush=True)
            best_t, best = G.TUNED[key][0]
            print("RESULT " + json.dumps({"what": "tune_best", "proj": name, "n": n, "k": k, "rows": rows,
                                          "config": best, "us": round(best_t * 1e6, 2),
                                          "gbs": round(nbytes / best_t / 1e9, 1)}), flush=True)
            base = got.base
            try:
                t = G.graph_seconds(lambda: base(x))
            except Exception as e:  # noqa: BLE001 - bitsandbytes' layer may not capture
                print("RESULT " + json.dumps({"what": "bnb_layer", "proj": name, "rows": rows, "error": repr(e)[:200]}))
                continue
            print("RESULT " + json.dumps({"what": "bnb_layer", "proj": name, "rows": rows, "us": round(t * 1e6, 2),
                                          "gbs": round(nbytes / t / 1e9, 1)}), flush=True)
    # the LoRA down-products of q, k, v: one launch against a cast + three cuBLAS products
    mats = [describe_proj(getattr(layer.self_attn, f"{p}_proj")).lora_a for p in "qkv"]
    for rows in rows_list:
        x = torch.randn(rows, mats[0].shape[1], dtype=torch.bfloat16, device="cuda")
        fused = G.graph_seconds(lambda: G.lora_down(x, mats))

        def plain():
            xc = x.to(mats[0].dtype)
            return [torch.nn.functional.linear(xc, a) for a in mats]

        ref = plain()
        err = max((a - b).abs().max().item() for a, b in zip(G.lora_down(x, mats), ref))
        print("RESULT " + json.dumps({"what": "lora_down", "rows": rows, "fused_us": round(fused * 1e6, 2),
                                      "plain_us": round(G.graph_seconds(plain) * 1e6, 2), "max_abs_diff": err}),
              flush=True)


def profile_step(model, rows: int, length: int, need: int):
    from torch.profiler import ProfilerActivity, profile

    from qfine.generation import engine

    dec = engine.decoder_for(model, rows, length)
    ids = torch.randint(10, 1000, (rows, 64), device="cuda")
    with torch.no_grad():
        dec.prefill(ids, torch.zeros(rows, dtype=torch.long, device="cuda"))
        token = torch.randint(10, 1000, (rows,), device="cuda")
        dec.step(token, 64)  # captures
        times = []
        for _ in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(20):
                dec.step(token, 65 + i)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 20)
        ms = statistics.median(times[1:])
        print("RESULT " + json.dumps({"what": "graph_step", "rows": rows, "ms_per_step": round(ms, 3),
                                      "weight_gbs": round(need / ms / 1e6, 1)}), flush=True)
        dec.slot.fill_(90)
        dec.tokens.copy_(token.view(-1, 1))
        dec._forward(dec.tokens, dec.slot)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec._forward(dec.tokens, dec.slot)
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.time_range.elapsed_us() for e in events)
    print("RESULT " + json.dumps({"what": "step_kernels", "rows": rows, "kernels": len(events),
                                  "kernel_ms": round(total_us / 1000, 3)}), flush=True)
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
            break
        except Exception as e:  # noqa: BLE001 - the key's name differs across torch versions
            print("table", key, repr(e)[:200])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--length", type=int, default=384)
    ap.add_argument("--tune", action="store_true")
    a = ap.parse_args()

    model = load_bench_model(a.model)
    need = step_bytes(model)
    print("RESULT " + json.dumps({"what": "model", "step_bytes": need, "device": torch.cuda.get_device_name(),
                                  "lora_dtype": str(next(p.dtype for n, p in model.named_parameters()
                                                         if "lora_A" in n))}), flush=True)
    with torch.no_grad():
        for rows in a.rows:
            try:
                profile_step(model, rows, a.length, need)
            except Exception as e:  # noqa: BLE001 - the other measurements still run
                print("RESULT " + json.dumps({"what": "step", "rows": rows, "error": repr(e)[:300]}), flush=True)
        if a.tune:
            tune(model, a.rows)


if __name__ == "__main__":
    main()
