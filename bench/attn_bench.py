"""The decode step's attention alone (:mod:`qfine.fast.attn_decode`) at the Llama-3.1-8B attention shape (32 query
heads over 8 kv heads, d = 128, bf16 cache), called as the engine calls it: the step's k, v written by the launch,
RoPE applied by it, o's LoRA down-product (r = 16, fp32 A) added by it. Every launch setting, the matrix
products' runs included (``QFINE_ATTN_DOT`` is switched on here), each timed as 20 calls replayed in a CUDA graph
(:func:`qfine.fast.gemv_kernel.graph_seconds`), beside the cache bytes a call reads. A setting whose output or
xa is not within 1e-2 (relative to the largest value) of the first setting's is reported as wrong, not timed.

    python bench/attn_bench.py [--batch 1 16] [--length 384 1024]

One JSON line per measurement (``RESULT {...}``), then the fastest setting of each shape.
"""

from __future__ import annotations

import argparse
import json

import torch


def case(b: int, length: int, slot: int):
    """(q, keys, values, pad, slot, new, rope, A) as the engine passes them at one decode step."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    q, keys, values = rand(b, 32, 1, 128), rand(b, 8, length, 128), rand(b, 8, length, 128)
    new = (rand(b, 8, 1, 128), rand(b, 8, 1, 128))
    rope = (rand(length, 128), rand(length, 128))
    pad = torch.zeros(b, dtype=torch.long, device="cuda")
    return q, keys, values, pad, torch.tensor([slot], device="cuda"), new, rope, rand(16, 4096, dtype=torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--length", type=int, nargs="+", default=[384, 1024])
    args = ap.parse_args()
    from qfine.fast import attn_decode as A
    from qfine.fast.gemv_kernel import graph_seconds

    A.DOT["on"] = True
    best = []
    for b in args.batch:
        for length in args.length:
            slot = length * 2 // 3  # two thirds of the cache seen, as midway through a 256-token answer
            q, keys, values, pad, cur, new, rope, a = case(b, length, slot)
            read = b * 8 * (slot + 1) * 128 * 2 * 2  # the visible slots' k and v, bf16
            ref = None
            timed = []
            for cfg in A.settings(length):
                def call(cfg=cfg):
                    return A.decode_attention(q, keys, values, pad, cur, 128 ** -0.5, new=new, rope=rope,
                                              config=cfg, down=a)
                out, xa = call()
                torch.cuda.synchronize()
                if ref is None:
                    ref = (out.float(), xa.float())
                diff = max(((out.float() - ref[0]).abs().max() / ref[0].abs().max()).item(),
                           ((xa.float() - ref[1]).abs().max() / ref[1].abs().max()).item())
                row = {"what": "attention", "batch": b, "length": length, "slot": slot, "config": cfg,
                       "max_rel_diff": diff}
                if diff > 1e-2:
                    row["wrong"] = True
                else:
                    seconds = graph_seconds(call)
                    row.update(us=round(seconds * 1e6, 2), gbs=round(read / seconds / 1e9, 1))
                    timed.append((seconds, cfg))
                print("RESULT " + json.dumps(row), flush=True)
            if timed:
                seconds, cfg = min(timed, key=lambda t: t[0])
                best.append((b, length, round(seconds * 1e6, 2), cfg))
    print(f"{'batch':>5} {'length':>6} {'µs':>8}  fastest setting")
    for b, length, us, cfg in best:
        print(f"{b:>5} {length:>6} {us:>8}  {cfg}")


if __name__ == "__main__":
    main()
