"""Microbenchmark: what the LoRA terms cost next to the frozen base GEMM, and what folding them into it saves.

For each projection group of a shape (T tokens, r = 16 per adapter) it times, on CUDA, with the weights
already dequantized (bf16):

* ``base``: the frozen GEMMs alone — forward y = x Wᵀ, backward dx = dy W;
* ``separate`` (qfine's layers up to commit cc0315a): plus x Aᵀ, y += (x Aᵀ) B_sᵀ (a read-modify-write of y),
  dy B_s, dx += (dy B_s) A, dA, dB;
* ``folded``: the LoRA terms ride in the base GEMMs along K — forward y = [x | x Aᵀ] [W | B_s]ᵀ,
  backward dx = [dy | dy B_s] [W ; A] — plus the same small GEMMs for x Aᵀ, dy B_s, dA, dB;
* ``folded_n``: forward as ``folded``; backward [dx | dy B_s] = dy [W | B_s] (the forward's weight, dy read
  once), then dx += (dy B_s) A, dA, dB.

    python bench/lora_gemm.py --shape 8b            # prints one JSON line per group and a total
    python bench/lora_gemm.py --shape 8b --ops      # the folded_n variant's GEMMs timed one by one
    python bench/lora_gemm.py --shape 8b --k-sweep  # the folded GEMMs' time against the folded width
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = {  # hidden, intermediate, q heads·hd, kv heads·hd
    "8b": (4096, 14336, 4096, 1024),
    "1b": (2048, 8192, 2048, 512),
}


def timed(fn, reps: int = 50) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (after 5 warm-ups)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def group(t: int, d_in: int, d_out: int, r: int, dev="cuda", dt=torch.bfloat16) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g) * 0.02  # noqa: E731
    x, dy = rnd(t, d_in), rnd(t, d_out)
    w, a, b = rnd(d_out, d_in), rnd(r, d_in), rnd(d_out, r)
    w_k = torch.cat([w, b], 1)            # (out, in + r): forward weight with B_s along K
    w_n = torch.cat([w, a], 0)            # (out + r, in): backward weight with A along K
    x_cat = torch.cat([x, x[:, :r]], 1)   # (T, in + r), last r columns overwritten with x Aᵀ
    dy_cat = torch.cat([dy, dy[:, :r]], 1)

    def base():
        x @ w.t()
        dy @ w

    def separate():
        y = x @ w.t()
        xa = x @ a.t()
        y.addmm_(xa, b.t())
        dx = dy @ w
        dyb = dy @ b
        dx.addmm_(dyb, a)
        dyb.t() @ x
        dy.t() @ xa

    def folded():
        torch.mm(x_cat[:, :d_in], a.t(), out=x_cat[:, d_in:])
        x_cat @ w_k.t()
        torch.mm(dy_cat[:, :d_out], b, out=dy_cat[:, d_out:])
        dy_cat @ w_n
        dy_cat[:, d_out:].t() @ x_cat[:, :d_in]
        dy_cat[:, :d_out].t() @ x_cat[:, d_in:]

    def folded_n():  # backward along N: [dx | dy B_s] = dy [W | B_s] (one read of dy), then dx += (dy B_s) A
        torch.mm(x_cat[:, :d_in], a.t(), out=x_cat[:, d_in:])
        x_cat @ w_k.t()
        g = dy @ w_k
        dx, dyb = g[:, :d_in], g[:, d_in:]
        dx.addmm_(dyb, a)
        dyb.t() @ x_cat[:, :d_in]
        dy.t() @ x_cat[:, d_in:]

    # the folded products equal the separate ones (bf16 rounding aside)
    torch.mm(x_cat[:, :d_in], a.t(), out=x_cat[:, d_in:])
    err = ((x_cat @ w_k.t()) - (x @ w.t() + (x @ a.t()) @ b.t())).abs().max().item()
    out = dict(t=t, d_in=d_in, d_out=d_out, r=r, max_abs_diff=err)  # noqa: C408
    g = dy @ w_k
    ref = dy @ w + (dy @ b) @ a
    g[:, :d_in].addmm_(g[:, d_in:], a)
    out["max_abs_diff_bwd"] = (g[:, :d_in] - ref).abs().max().item()
    for name, fn in (("base", base), ("separate", separate), ("folded", folded), ("folded_n", folded_n)):
        out[name + "_ms"] = round(timed(fn), 4)
    return out


def group_ops(t: int, d_in: int, d_out: int, r: int, dev="cuda", dt=torch.bfloat16) -> dict:
    """Each GEMM of the ``folded_n`` variant timed on its own (ms), next to the base GEMMs: where the
    LoRA overhead goes."""
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g) * 0.02  # noqa: E731
    x, dy = rnd(t, d_in), rnd(t, d_out)
    w, a, b = rnd(d_out, d_in), rnd(r, d_in), rnd(d_out, r)
    w_k = torch.cat([w, b], 1)
    x_cat = torch.cat([x, x[:, :r]], 1)
    gk = dy @ w_k
    dx, dyb, xa = gk[:, :d_in], gk[:, d_in:], x_cat[:, d_in:]
    ops = {
        "fwd_base": lambda: x @ w.t(),
        "fwd_folded": lambda: x_cat @ w_k.t(),
        "bwd_base": lambda: dy @ w,
        "bwd_folded": lambda: dy @ w_k,
        "xa": lambda: torch.mm(x_cat[:, :d_in], a.t(), out=x_cat[:, d_in:]),
        "dx_add": lambda: dx.addmm_(dyb, a),
        "dA": lambda: dyb.t() @ x,
        "dB": lambda: dy.t() @ xa,
    }
    return {k + "_ms": round(timed(fn), 4) for k, fn in ops.items()}


def k_sweep(t: int, d: int, n_out: int, extras=(0, 16, 32, 48, 64, 96, 128)) -> list[dict]:
    """The folded GEMMs (forward (T, d + e) @ (N, d + e)ᵀ, backward (T, N) @ (N, d + e)) for each
    extra width e: how cuBLAS's kernel choice reacts to a K or N that is not a multiple of 64."""
    rows = []
    for e in extras:
        x = torch.randn(t, d + e, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_out, d + e, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(t, n_out, device="cuda", dtype=torch.bfloat16)
        rows.append(dict(t=t, d=d, n_out=n_out, extra=e, fwd_ms=round(timed(lambda: x @ w.t()), 4),
                         bwd_ms=round(timed(lambda: dy @ w), 4)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--round-r", type=int, default=1, help="pad each group's stacked rank up to a multiple of this")
    ap.add_argument("--k-sweep", action="store_true", help="time the folded GEMMs against the folded width")
    ap.add_argument("--ops", action="store_true", help="time the folded_n variant's GEMMs one by one")
    a = ap.parse_args()
    h, i, q, kv = SHAPES[a.shape]
    rr = lambda n: -(-n // a.round_r) * a.round_r  # noqa: E731
    if a.k_sweep:
        for n_out in (2 * i, q + 2 * kv):
            for row in k_sweep(a.tokens, h, n_out):
                print(json.dumps(row))
        return
    if a.ops:
        dims = {"qkv": (h, q + 2 * kv, 3), "o": (q, h, 1), "gate_up": (h, 2 * i, 2), "down": (i, h, 1)}
        for k, (d_in, d_out, n) in dims.items():
            print(json.dumps(dict(group=k, t=a.tokens, r=rr(n * a.r), **group_ops(a.tokens, d_in, d_out, rr(n * a.r)))))
        return
    rows = {"qkv": group(a.tokens, h, q + 2 * kv, rr(3 * a.r)), "o": group(a.tokens, q, h, rr(a.r)),
            "gate_up": group(a.tokens, h, 2 * i, rr(2 * a.r)), "down": group(a.tokens, i, h, rr(a.r))}
    for k, v in rows.items():
        print(json.dumps(dict(group=k, **v)))
    names = ("base_ms", "separate_ms", "folded_ms", "folded_n_ms")
    tot = {k: round(sum(v[k] for v in rows.values()), 3) for k in names}
    print(json.dumps(dict(group="layer", shape=a.shape, **tot,
                          **{f"lora_overhead_{k[:-3]}_ms": round(tot[k] - tot["base_ms"], 3) for k in names[1:]})))


if __name__ == "__main__":
    main()
