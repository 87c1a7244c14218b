"""Decode speed of qfine's generation engine against transformers' generate on the same 4-bit model + adapter.

usage: python bench/generate_bench.py --model DIR [--batch 1 16] [--new 256] [--prompt 128] [--impl qfine transformers]

Loads DIR as NF4 (double quant) bf16 through qfine, adds a LoRA adapter (r=16, all seven projections, B random so
that the adapter changes the output), and for each batch size times whole generations of ``--new`` tokens from
random ``--prompt``-token prompts (no stop token: every row runs the full length). Decode tokens/s =
batch × (new − 1) / (time(new) − time(1)): the prefill and the first token are taken out. Each figure is the
median of ``--repeat`` runs after one warm-up run (which captures the engine's graph).

The memory-bandwidth limit at batch 1 is the bytes a decode step must read — every 4-bit weight with its
absmax once, the bf16 output head, norms and adapters — over the device's copy bandwidth, measured here on
a 2 GiB device-to-device copy (bytes read + written / time), and over the datasheet figure passed as
``--peak-gbs``. One JSON line per measurement (``RESULT {...}``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read and written (median of 5)."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del src, dst
    return 2 * (2 << 30) / statistics.median(times[1:]) / 1e9


def step_bytes(model) -> int:
    """Bytes one batch-1 decode step reads: parameters and quantization state of everything but the
    input embedding (of which it reads one row), and the output head (read whole, also when it is tied
    to the input embedding)."""
    head = model.get_output_embeddings().weight
    total = head.numel() * head.element_size()
    seen = {head.data_ptr()}
    for name, p in model.named_parameters():
        if "embed_tokens" in name or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += param_bytes(p)
    return total


def param_bytes(p) -> int:
    """Bytes of a parameter as stored, with its quantization state (absmax, offset, code books) if any."""
    total = p.numel() * p.element_size()
    state = getattr(p, "quant_state", None)
    if state is not None:
        for t in (state.absmax, getattr(state, "offset", None), state.code,
                  getattr(getattr(state, "state2", None), "absmax", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def load_bench_model(folder: str):
    """The folder as NF4 (double quant) bf16 on CUDA through qfine, with a LoRA adapter (r=16, all seven
    projections) whose B is drawn at random (seed 1) so that it changes the output; in eval mode."""
    from qfine import LoraSettings, ModelConfig, add_lora, load_model

    loaded = load_model(ModelConfig(source=folder, quantization="nf4", double_quant=True, compute_dtype="bf16",
                                    device="cuda"))
    model = add_lora(loaded.model, LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=TARGETS))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def timed(fn, repeat: int) -> float:
    fn()  # warm-up: compilation, graph capture
    out = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peer-repeat", type=int, default=1, help="--repeat for transformers' generate (slow)")
    ap.add_argument("--impl", nargs="+", default=["qfine", "transformers"])
    ap.add_argument("--peak-gbs", type=float, default=0.0, help="the device's datasheet memory bandwidth")
    a = ap.parse_args()

    from qfine.generation import engine

    model = load_bench_model(a.model)
    vocab = model.config.vocab_size
    need = step_bytes(model)
    copy = copy_bandwidth()
    print("RESULT " + json.dumps({"what": "limit", "step_bytes": need, "copy_gbs": round(copy, 1),
                                  "limit_tok_s_copy": round(copy * 1e9 / need, 1),
                                  "limit_tok_s_peak": round(a.peak_gbs * 1e9 / need, 1) if a.peak_gbs else None,
                                  "device": torch.cuda.get_device_name()}), flush=True)
    prompts = {b: torch.randint(10, vocab - 10, (b, a.prompt), generator=torch.Generator().manual_seed(b)).cuda()
               for b in a.batch}
    for batch in a.batch:  # both implementations at one batch size before the next: a cut-short call keeps ratios
        for impl in a.impl:
            if impl == "qfine":
                def run(n, ids=prompts[batch]):
                    engine.generate_tokens(model, ids.tolist(), n, stop_ids=[], pad_id=0)
            else:
                def run(n, ids=prompts[batch]):
                    with torch.no_grad():
                        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
            torch.cuda.reset_peak_memory_stats()
            repeat = a.repeat if impl == "qfine" else a.peer_repeat
            t_full = timed(lambda: run(a.new), repeat)
            t_one = timed(lambda: run(1), repeat)
            decode = batch * (a.new - 1) / (t_full - t_one)
            print("RESULT " + json.dumps({
                "what": "decode", "impl": impl, "batch": batch, "new": a.new, "prompt": a.prompt,
                "decode_tok_s": round(decode, 1), "ms_per_step": round(1000 * (t_full - t_one) / (a.new - 1), 3),
                "whole_s": round(t_full, 3), "prefill_s": round(t_one, 4),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
    from qfine.fast import gemv_kernel
    for key, timings in gemv_kernel.TUNED.items():  # what the 4-bit product's tuner chose for each shape
        (seconds, cfg), others = timings[0], len(timings) - 1
        # ("group" | "silu", device, rows, n or (n, ...), k, ...) or (device, rows, n, k, ...)
        group = key[0] if isinstance(key[0], str) else False
        rows, n, k = key[2:5] if group else key[1:4]
        print("RESULT " + json.dumps({"what": "tuned", "group": group, "rows": rows, "n": n, "k": k, "config": cfg,
                                      "us": round(seconds * 1e6, 2), "other_settings": others,
                                      "next": [[round(t * 1e6, 2), c] for t, c in timings[1:4]]}), flush=True)
    from qfine.fast import attn_decode
    for key, timings in attn_decode.TUNED.items():  # what the attention's tuner chose for each shape
        print("RESULT " + json.dumps({"what": "tuned_attention", "q": list(key[1]), "cache": list(key[2]),
                                      "timed": [[round(t * 1e6, 2), c] for t, c in timings]}), flush=True)
    # greedy agreement on the same prompts (batch 4, 64 tokens)
    prompts = torch.randint(10, vocab - 10, (4, 32), generator=torch.Generator().manual_seed(7)).cuda()
    fast = engine.generate_tokens(model, prompts.tolist(), 64, stop_ids=[], pad_id=0).tokens
    with torch.no_grad():
        ref = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=64,
                             min_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=None)[:, 32:].tolist()
    same = [next((i for i, (x, y) in enumerate(zip(f, r)) if x != y), len(f)) for f, r in zip(fast, ref)]
    print("RESULT " + json.dumps({"what": "greedy_agreement", "rows": 4, "new": 64,
                                  "first_difference_at": same}), flush=True)


if __name__ == "__main__":
    main()
