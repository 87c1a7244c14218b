"""The 4-bit decode product alone, at the Llama-3.1-8B projection shapes: every launch setting of qfine's
kernels (:func:`qfine.fast.gemv_kernel.candidates`, plus a wider sweep of :mod:`qfine.fast.gemv_rows`'
tensor-core kernel) against bitsandbytes' own paths, each timed as 20 calls replayed in a CUDA graph
(:func:`qfine.fast.gemv_kernel.graph_seconds`, the way a decode step runs them), with the weight bytes read
per second, and a device-to-device copy of the same bytes as the bandwidth reference. Random NF4 weights
(double quantization), bf16 activations, an r=16 adapter term in the epilogue as the engine runs it. A
setting whose result is not within 1e-2 (relative to the largest output) of dequantize-then-matmul is
reported as wrong, not timed.

    python bench/gemv_bench.py [--rows 1 64 16] [--shapes q gate down kv] [--sweep 1 64] [--fetch 1]

``--fetch ROWS``: at those row counts every "mma" setting is timed again with each way of requesting the
weights from memory in :data:`FETCH` (``mma4.cu``'s L2B, AHEAD and BULK), each its own family in the table.

One JSON line per measurement (``RESULT {...}``), then a table of the best of each family.
"""

from __future__ import annotations

import argparse
import json

import torch
from generate_bench import param_bytes

SHAPES = {"q": (4096, 4096), "kv": (1024, 4096), "gate": (14336, 4096), "down": (4096, 14336)}
FETCH = [{"L2B": 128}, {"L2B": 256}, {"AHEAD": 4}, {"BULK": 4}, {"BULK": 8}, {"BULK": 4, "L2B": 256}]


def sweep(m: int, k: int) -> list[dict]:
    """Settings beyond the tuner's own list: for the tensor-core kernel tile heights, warps, pipeline stages,
    the gather decode beside the byte permutes; for the one-row kernel its tile, k step, warps, prefetch."""
    from qfine.fast.gemv_rows import fits

    out = [{"KERNEL": "tc", "BLOCK_N": bn, "SPLIT": split, "num_warps": warps, "PRMT": True, "SERIAL": split > 1}
           for bn in (32, 64, 128, 256) for warps in (4, 8) for split in (1, 2, 4, 8, 16)
           if (bn < 256 or m <= 16) and (bn > 32 or warps == 4)]
    out += [{"KERNEL": "tc", "BLOCK_N": 64, "SPLIT": split, "num_warps": 4, "num_stages": stages, "PRMT": True,
             "SERIAL": True} for stages in (2, 4) for split in (2, 4)]
    out += [{"KERNEL": "tc", "BLOCK_N": 64, "SPLIT": split, "num_warps": 4, "PRMT": True} for split in (2, 4, 8)]
    out += [{"KERNEL": "tc", "BLOCK_N": bn, "SPLIT": split, "num_warps": 4, "PRMT": True, "SERIAL": split > 1,
             "SUB": sub} for bn in (64, 128) for split in (1, 2, 4, 8) for sub in (2, 4)]
    out = [cfg for cfg in out if fits(cfg, m, k, 64)]
    out += [{"KERNEL": "tc", "BLOCK_N": 64, "SPLIT": s, "num_warps": 4, "PRMT": False} for s in (2, 4)]
    if m <= 16:  # the CUDA tensor-core kernel: 2 and 16 warps, 4 row tiles, 8 k splits beside the tuner's
        out += [{"KERNEL": "mma", "NT": 1 if m <= 8 else 2, "WARPS": w, "TILES": t, "SPLIT": s, "WIDE": True}
                for w in (2, 4, 8, 16) for t in (1, 2, 4) for s in (1, 2, 4, 8)
                if (w in (2, 16) or t == 4 or s == 8) and fits({"KERNEL": "mma", "NT": 2, "WARPS": w, "TILES": t,
                                                                  "SPLIT": s}, m, k, 64)]
    if m == 1:  # the one-row kernel: x read as int32 pairs (half the loads), and one axis at a time moved
        # away from the tuner's setting (BLOCK_N 16, BLOCK_K 512, 4 warps, prefetch): rows, k step, warps
        row = {"KERNEL": "row", "BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "PRMT": True, "PREFETCH": True}
        moved = [{"XPAIRS": True}, {"PREFETCH": False}] + [{"BLOCK_N": bn} for bn in (8, 32)]
        moved += [{"BLOCK_K": bk} for bk in (256, 1024)] + [{"num_warps": w} for w in (2, 8)]
        out += [cfg for change in moved for s in (1, 2, 4)
                if fits(cfg := {**row, **change, "SPLIT": s}, 1, k, 64)]
    return out


def family(cfg: dict) -> str:
    if cfg.get("BNB_GEMV"):
        return "bnb_gemv"
    if cfg.get("DEQUANTIZE"):
        return "bnb_dequant_cublas"
    if cfg.get("KERNEL") == "mma":
        return "mma" + "".join(f"_{key.lower()}{cfg[key]}" for key in ("L2B", "AHEAD", "BULK") if cfg.get(key))
    if cfg.get("KERNEL"):
        return f"{cfg['KERNEL']}_{'prmt' if cfg.get('PRMT') else 'gather'}"
    return "tile_select" if cfg.get("SELECT") else "tile_pairs"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 16])
    ap.add_argument("--shapes", nargs="+", default=["q", "gate", "down", "kv"])
    ap.add_argument("--sweep", type=int, nargs="*", default=[], help="row counts to sweep beyond the tuner's list")
    ap.add_argument("--fetch", type=int, nargs="*", default=[],
                    help="row counts at which the mma settings are timed with each way of requesting the weights")
    a = ap.parse_args()
    import bitsandbytes as bnb

    from qfine.fast import gemv_kernel as G

    torch.manual_seed(0)
    dev = torch.device("cuda")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / G.graph_seconds(lambda: dst.copy_(src), launches=5) / 1e9  # read + write
    print("RESULT " + json.dumps({"what": "copy", "GBps": round(copy_gbs, 1)}), flush=True)
    src = dst = None
    best = {}
    for name in a.shapes:
        n, k = SHAPES[name]
        w = bnb.nn.Params4bit(torch.randn(n, k, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                              quant_type="nf4", compress_statistics=True).to(dev)
        nbytes = param_bytes(w)
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        b = torch.randn(n, 16, dtype=torch.bfloat16, device=dev) * 0.02
        for m in a.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            xa = torch.randn(m, 16, dtype=torch.bfloat16, device=dev)
            lora = (xa, b, 2.0)
            want = (x.float() @ deq.float().t() + 2.0 * xa.float() @ b.float().t())
            cfgs = G.candidates(m, n, k, 64) + (sweep(m, k) if m in a.sweep else [])
            if m in a.fetch:
                cfgs += [{**cfg, **fetch} for fetch in FETCH for cfg in cfgs if cfg.get("KERNEL") == "mma"]
                G.precompile(x, [(w, lora)], None, [cfg for cfg in cfgs if cfg.get("KERNEL") == "mma"])
            seen = set()
            for cfg in cfgs:
                key = json.dumps(cfg, sort_keys=True)
                if key in seen:
                    continue
                seen.add(key)
                rec = {"what": "gemv", "shape": name, "n": n, "k": k, "rows": m, "family": family(cfg), "config": cfg}
                try:
                    with torch.no_grad():
                        got = G.matmul_4bit(x, w, lora, config=cfg).float()
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    rec["err"] = round(err, 5)
                    if not err < 1e-2:
                        rec["wrong"] = True
                    else:
                        with torch.no_grad():
                            t = G.graph_seconds(lambda c=cfg: G.matmul_4bit(x, w, lora, config=c))
                        rec.update(us=round(t * 1e6, 2), GBps=round(nbytes / t / 1e9, 1),
                                   of_copy=round(nbytes / t / 1e9 / copy_gbs, 3))
                        fam = (name, m, rec["family"])
                        if fam not in best or best[fam]["us"] > rec["us"]:
                            best[fam] = rec
                except Exception as e:  # noqa: BLE001 - a setting that fails to build is a result
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print("RESULT " + json.dumps(rec), flush=True)
    print(f"\ncopy bandwidth {copy_gbs:.0f} GB/s")
    print(f"{'shape':6} {'rows':>4} {'family':20} {'us':>8} {'GB/s':>7}  config")
    for (name, m, fam), rec in sorted(best.items(), key=lambda t: (t[0][0], t[0][1], t[1]["us"])):
        print(f"{name:6} {m:4} {fam:20} {rec['us']:8.2f} {rec['GBps']:7.0f}  {json.dumps(rec['config'])}")
        print("RESULT " + json.dumps({**rec, "what": "best"}), flush=True)


if __name__ == "__main__":
    main()
