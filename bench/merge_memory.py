"""Peak host memory of the exact merge on an 8B-shaped model (random weights; CPU is enough).

Builds Llama-3.1-8B's shapes directly in 4-bit (NF4 + double quant, one layer at a time, so no
16 GB checkpoint is needed), adds LoRA r=16 on all 7 projections with random B, then runs
``qfine.export.merge.save_merged`` to bf16 shards while a thread samples the process's resident memory.

    python bench/merge_memory.py --out /tmp/merged-8b [--layers 32] [--shard-gib 2]

Prints the resident memory before the merge (the 4-bit model + LoRA), the peak during it, and the
budget "4-bit model + one layer in fp32 + one output shard" that the design aims for.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

import torch


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakSampler(threading.Thread):
    """Samples VmRSS every 20 ms until stopped; ``peak`` is the maximum seen (bytes)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = rss_bytes()
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.02)

    def stop(self):
        self._done.set()
        self.join()


def build_4bit_llama(layers: int):
    """Llama-3.1-8B shapes with every decoder linear as an NF4 (double-quant) Linear4bit."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    model.model.embed_tokens.weight = torch.nn.Parameter(rand(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
    model.lm_head.weight = torch.nn.Parameter(rand(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
    model.model.norm.weight = torch.nn.Parameter(torch.ones(cfg.hidden_size, dtype=torch.bfloat16))
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # its inv_freq buffer, off the meta device
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = torch.nn.Parameter(torch.ones(cfg.hidden_size, dtype=torch.bfloat16))
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True, device="meta")
                q.weight = bnb.nn.Params4bit(rand(lin.out_features, lin.in_features), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True)._quantize("cpu")
                q.support_avx512bf16_for_cpu = False
                setattr(parent, name, q)
    return model


def build_adapted_llama(layers: int):
    """:func:`build_4bit_llama` with LoRA r=16 on all 7 projections and random B (a zero B would merge
    to the base and hide the update's cost)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_4bit_llama(layers), LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/qfine-merged-8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    args = ap.parse_args()

    from qfine.export.merge import save_merged

    t0 = time.perf_counter()
    model = build_adapted_llama(args.layers)
    build_s = time.perf_counter() - t0
    model_bytes = model.get_base_model().get_memory_footprint()
    before = rss_bytes()
    shutil.rmtree(args.out, ignore_errors=True)
    sampler = PeakSampler()
    sampler.start()
    t1 = time.perf_counter()
    save_merged(model, None, args.out, dtype="bf16", max_shard_bytes=int(args.shard_gib * 2**30))
    merge_s = time.perf_counter() - t1
    sampler.stop()
    written = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    layer_fp32 = 14336 * 4096 * 4
    budget = before + layer_fp32 + args.shard_gib * 2**30
    gib = 2**30
    print(f"8B-shaped ({args.layers} layers) 4-bit model footprint {model_bytes / gib:.2f} GiB, built in {build_s:.0f} s")
    print(f"resident before merge {before / gib:.2f} GiB; peak during merge {sampler.peak / gib:.2f} GiB "
          f"(+{(sampler.peak - before) / gib:.2f} GiB)")
    print(f"budget 'model + one fp32 layer ({layer_fp32 / gib:.2f} GiB) + one shard ({args.shard_gib} GiB)' "
          f"= {budget / gib:.2f} GiB")
    print(f"wrote {written / gib:.2f} GiB of bf16 safetensors in {merge_s:.0f} s")
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
