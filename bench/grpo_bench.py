"""GRPO step time: qfine (TRL's loop with qfine's engine for the rollouts and its fused layers for the
training forward), TRL (GRPOTrainer + peft + bitsandbytes, transformers' generate) and Unsloth (its patched
GRPOTrainer, ``fast_inference=False``: vLLM is not installed on the GPU machine), each in its own process on
the same NF4 folder (bench/make_model.py --nf4) and the same prompts.

Prompts are random words of bench/make_model.py's word-level tokenizer, one token each (--prompt-len of them);
each step samples --group completions for each of --prompts prompts, up to --completion-len tokens at
temperature 1 (a random-init model almost never samples its end token, so nearly every completion is full
length; the record gives the mean length). The reward is a fixed hash of the completion's text, so groups
have a spread and the loss a gradient. LoRA r=16 (alpha 32) on all seven projections, bf16, beta 0 (TRL's
default: no reference pass), gradient checkpointing, lr 1e-6. Step time: the median over steps 2.. of
--steps, synchronised, generation included; ``rollout_s`` the median of the same steps' completion
generation alone (timed around the trainer's ``_generate_single_turn``), ``train_part_s`` the rest. One JSON
line per run on stdout (``RESULT {...}``).

    python bench/grpo_bench.py --impl qfine|trl|unsloth --model /tmp/m_8b_nf4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import zlib

from dpo_bench import TARGETS, StepTimer


def prompts(n: int, length: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(f"w{rng.randrange(4, 1000)}" for _ in range(length))} for _ in range(n)]


def hashed_reward(prompts, completions, **kw) -> list[float]:
    """A fixed pseudo-random score per completion text in [0, 1)."""
    return [zlib.crc32(str(c).encode()) % 1000 / 1000 for c in completions]


def config(a, **extra):
    from trl import GRPOConfig

    return GRPOConfig(output_dir=f"/tmp/grpo_bench_{a.impl}", per_device_train_batch_size=a.prompts * a.group,
                      num_generations=a.group, max_completion_length=a.completion_len, max_steps=a.steps,
                      learning_rate=1e-6, bf16=True, logging_steps=1, report_to=[], save_strategy="no", beta=0.0,
                      temperature=1.0, dataloader_num_workers=0, remove_unused_columns=False, **extra)


def qfine_trainer(a, ds, timer):
    from transformers import AutoTokenizer

    from qfine import LoraSettings, ModelConfig, add_lora, load_model
    from qfine.fast import apply_fast_path
    from qfine.objectives.common import keeping_adapter_dtypes
    from qfine.objectives.grpo import trainer_class

    tok = AutoTokenizer.from_pretrained(a.model)
    loaded = load_model(ModelConfig(source=a.model, quantization="nf4", double_quant=True, compute_dtype="bf16",
                                    device="cuda"))
    model = add_lora(loaded.model, LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=TARGETS),
                     gradient_checkpointing=True, seed=0)
    print(f"[qfine] {apply_fast_path(model)}", flush=True)
    args = config(a, gradient_checkpointing=False)  # qfine checkpoints its own layers (add_lora)
    return keeping_adapter_dtypes(model, lambda: trainer_class()(
        model=model, reward_funcs=[hashed_reward], args=args, train_dataset=ds, processing_class=tok,
        callbacks=[timer]))


def peer_trainer(a, ds, timer):
    import torch

    if a.impl == "unsloth":
        from unsloth import FastLanguageModel  # patches TRL's trainers on import
    from trl import GRPOTrainer

    seq = a.prompt_len + a.completion_len + 8
    if a.impl == "unsloth":
        model, tok = FastLanguageModel.from_pretrained(a.model, max_seq_length=seq, load_in_4bit=True, dtype=None,
                                                       fast_inference=False, local_files_only=True)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                                 random_state=0, max_seq_length=seq)
        peft_config, args = None, config(a)
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     device_map={"": 0})
        tok = AutoTokenizer.from_pretrained(a.model)
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=TARGETS,
                                 task_type="CAUSAL_LM")
        args = config(a, gradient_checkpointing=True)
    return GRPOTrainer(model=model, reward_funcs=[hashed_reward], args=args, train_dataset=ds, processing_class=tok,
                       peft_config=peft_config, callbacks=[timer])


def time_rollouts(trainer) -> list[float]:
    """Seconds of each call of the trainer's completion generation (TRL's ``_generate_single_turn``, which
    qfine's trainer overrides), synchronised: filled in as the trainer runs."""
    import torch

    name = "_generate_single_turn"
    inner, seconds = getattr(trainer, name), []

    def timed(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        return out

    setattr(trainer, name, timed)
    return seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", required=True, choices=["qfine", "trl", "unsloth"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--completion-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    import torch
    from datasets import Dataset

    ds = Dataset.from_list(prompts(a.prompts * a.steps, a.prompt_len))
    timer = StepTimer()
    rec = {"impl": a.impl, "prompts": a.prompts, "group": a.group, "prompt": a.prompt_len,
           "completion": a.completion_len, "device": torch.cuda.get_device_name(0)}
    try:
        trainer = qfine_trainer(a, ds, timer) if a.impl == "qfine" else peer_trainer(a, ds, timer)
        rollouts = time_rollouts(trainer)
        serves = getattr(trainer, "engine_serves", None)
        rec["rollouts"] = "qfine engine" if serves and serves(None, {}) else "transformers generate"
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
        steady = timer.times[1:] or timer.times
        step_s = statistics.median(steady)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        lengths = [h.get("completions/mean_length") for h in logs if h.get("completions/mean_length") is not None]
        rec.update(step_s=round(step_s, 3), steps=len(timer.times), step_times=[round(t, 3) for t in timer.times],
                   train_s=round(time.perf_counter() - start, 1),
                   mean_completion_len=round(statistics.mean(lengths), 1) if lengths else None,
                   completion_tok_s=round(a.prompts * a.group * (statistics.mean(lengths) if lengths else
                                                                 a.completion_len) / step_s, 1),
                   peak_alloc_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   first_loss=round(logs[0]["loss"], 5) if logs else None,
                   rollout_s=round(statistics.median(rollouts[1:] or rollouts), 3) if rollouts else None)
        rec["train_part_s"] = round(step_s - rec["rollout_s"], 3) if rollouts else None
    except Exception as e:  # noqa: BLE001 - a peer failing is a result to record, not a crash of the bench
        import traceback
        traceback.print_exc()
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print("RESULT " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
