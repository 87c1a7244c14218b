"""Table of a bench/run.sh results file: tokens/s, peak memory, first-step loss, ratios to the peers.

usage: python3 bench/summarize.py results.jsonl [--env env.txt] [--append docs/benchmarks.md --title TEXT]
Prints a plain table; with --append, adds a Markdown section (device, versions, table) to the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEERS = ("hf_autocast", "unsloth")
NAMES = {"hf_autocast": "peft+bnb autocast", "unsloth": "Unsloth", "qfine_fast_nockpt_autocast": "qfine fast",
         "qfine_fast_autocast": "qfine fast + ckpt", "qfine_fast_offload_autocast": "qfine fast + offloaded ckpt",
         "qfine_ref_autocast": "qfine plain", "qfine_fast_nockpt_graph_autocast": "qfine fast + graph",
         "qfine_fast_nockpt_graph_res4_autocast": "qfine fast + graph + 4 GiB resident weights",
         "qfine_fast_offload_graph_autocast": "qfine offloaded ckpt + graph"}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if "tok_s" not in r:
        why = r.get("error") or r.get("skipped") or "no timing"
        return "OOM" if "OutOfMemory" in why or "out of memory" in why else why[:40]
    return f"{r['tok_s']:,.0f} tok/s, {r['peak_alloc_GiB']:.1f}/{r['peak_res_GiB']:.1f} GiB, loss {r['loss_first'][0]:.4f}"


def table(rows: list[dict]) -> list[str]:
    impls = sorted({r["impl"] for r in rows if "impl" in r}, key=lambda i: (i.startswith("qfine"), i))
    shapes = sorted({(r["tag"], r["bs"], r["seq"]) for r in rows if "bs" in r}, key=lambda k: (k[0] != "8b", k[1] * k[2], k[1]))
    by = {(r["impl"], r["tag"], r["bs"], r["seq"]): r for r in rows if "bs" in r}
    head = ["shape", "bs × seq"] + [NAMES.get(i, i) for i in impls]
    qf = [i for i in impls if i.startswith("qfine")]
    head += [f"{NAMES.get(q, q)} / {NAMES[p]}" for q in qf for p in PEERS if p in impls]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tag, bs, seq in shapes:
        line = [tag, f"{bs} × {seq}"] + [cell(by.get((i, tag, bs, seq))) for i in impls]
        for q in qf:
            for p in PEERS:
                if p not in impls:
                    continue
                a, b = by.get((q, tag, bs, seq), {}), by.get((p, tag, bs, seq), {})
                line.append(f"{a['tok_s'] / b['tok_s']:.2f}×" if "tok_s" in a and "tok_s" in b else "–")
        out.append("| " + " | ".join(line) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--env", type=Path)
    ap.add_argument("--append", type=Path)
    ap.add_argument("--title", default="Side-by-side QLoRA throughput")
    a = ap.parse_args()
    rows = load(a.results)
    lines = table(rows)
    print("\n".join(lines))
    if a.append:
        env = a.env.read_text().strip() if a.env and a.env.exists() else ""
        text = [f"\n## {a.title}\n", "Cells: tokens/s, peak allocated/reserved GiB, first-step loss. Median step "
                "time over steps 3.. of `bench/train_bench.py`; each implementation in its own process.", "",
                "    " + env.replace("\n", "\n    "), "", *lines, ""]
        with a.append.open("a") as f:
            f.write("\n".join(text))


if __name__ == "__main__":
    main()
