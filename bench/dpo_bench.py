"""DPO training throughput and peak memory: qfine, TRL (DPOTrainer + peft + bitsandbytes) and Unsloth
(its patched DPOTrainer), each in its own process, on the same random-init checkpoint and the same pairs.

Pairs are random words of bench/make_model.py's word-level tokenizer, one token each: a prompt of
--prompt-len tokens and chosen/rejected completions of --completion-len tokens, so every implementation
trains on the same token counts. NF4 + double quant, LoRA r=16 (alpha 32) on all seven projections,
beta 0.1, bf16, AdamW; the reference is the base with the adapter off in all three. Tokens/s counts the
chosen and rejected sequences of a step (2 × pairs × (prompt + completion)); the median step time over
steps 3.. of --steps. One JSON line per run on stdout (``RESULT {...}``).

    python bench/dpo_bench.py --impl qfine --model /tmp/m_8b [--offload] [--no-ckpt] [--mode dpo|dpo-precompute|sft]
    python bench/dpo_bench.py --impl trl --model /tmp/m_8b
    python bench/dpo_bench.py --impl unsloth --model /tmp/m_8b
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def texts(n_pairs: int, prompt_len: int, completion_len: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(n):
        return " ".join(f"w{rng.randrange(4, 1000)}" for _ in range(n))

    return [{"prompt": words(prompt_len), "chosen": words(completion_len), "rejected": words(completion_len)}
            for _ in range(n_pairs)]


class StepTimer:
    """TrainerCallback-like step timing (synchronised), built lazily so the module imports without transformers."""

    def __new__(cls):
        import torch
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self._t = [], None

            def on_step_begin(self, args, state, control, **kw):
                torch.cuda.synchronize()
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self._t)

        return _Timer()


def qfine_trainer(a, rows, timer):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainingArguments

    from qfine import LoraSettings, ModelConfig, add_lora, load_model
    from qfine.fast import apply_fast_path, offload_checkpoints
    from qfine.objectives.pref_data import PairCollator
    from qfine.objectives.preference import PreferenceTrainer

    tok = AutoTokenizer.from_pretrained(a.model)
    eos = tok.eos_token_id
    enc = []
    for r in rows:  # prompt ids, then each completion + EOS scored (as qfine's pair rows are)
        p = tok.encode(r["prompt"], add_special_tokens=False)
        c, j = (tok.encode(r[k], add_special_tokens=False) + [eos] for k in ("chosen", "rejected"))
        enc.append({"chosen_ids": p + c, "chosen_labels": [-100] * len(p) + c,
                    "rejected_ids": p + j, "rejected_labels": [-100] * len(p) + j})
    loaded = load_model(ModelConfig(source=a.model, quantization="nf4", double_quant=True, compute_dtype="bf16",
                                    device="cuda"))
    model = add_lora(loaded.model, LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=TARGETS),
                     gradient_checkpointing=not a.no_ckpt, seed=0)
    print(f"[qfine] {apply_fast_path(model)}", flush=True)
    if a.offload:
        print(f"[qfine] offloaded checkpoints: {offload_checkpoints(model)} layers", flush=True)
    model.train()
    args = TrainingArguments(output_dir="/tmp/dpo_bench_qfine", per_device_train_batch_size=a.pairs,
                             max_steps=a.steps, learning_rate=5e-6, bf16=True, logging_steps=1, report_to=[],
                             save_strategy="no", remove_unused_columns=False, gradient_checkpointing=False,
                             dataloader_num_workers=0)
    ds, table, cls = Dataset.from_list(enc), None, PreferenceTrainer
    if a.mode == "dpo-precompute":
        from qfine.objectives import pref_reference
        from qfine.objectives.preference import sequence_logps

        ds = ds.add_column("row", list(range(len(ds))))
        start = time.perf_counter()
        chosen, rejected = pref_reference.compute(model, ds, sequence_logps, tok.pad_token_id, a.pairs)
        torch.cuda.synchronize()
        a.precompute_s = round(time.perf_counter() - start, 2)  # once per run, not in the step time
        table = {"train_chosen": chosen, "train_rejected": rejected}
    elif a.mode == "sft":
        from qfine.objectives.preference import sequence_logps

        class SFTOnPairs(PreferenceTrainer):
            """The same rows and head as DPO, the loss SFT's: the mean NLL of the reply tokens, no reference."""

            def preference_loss(self, model, inputs, split="train"):
                logp, count = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
                return -logp.sum() / count.sum(), {}

        cls = SFTOnPairs
    torch.cuda.reset_peak_memory_stats()
    return cls(model=model, args=args, train_dataset=ds, data_collator=PairCollator(tok.pad_token_id),
               callbacks=[timer], kind="dpo", beta=0.1, gamma=0.0, reference=True, reference_table=table)


def trl_trainer(a, rows, timer, unsloth: bool = False):
    import torch
    from datasets import Dataset

    if unsloth:
        from unsloth import FastLanguageModel, PatchDPOTrainer
        PatchDPOTrainer()
    from trl import DPOConfig, DPOTrainer

    seq = a.prompt_len + a.completion_len + 8
    if unsloth:
        model, tok = FastLanguageModel.from_pretrained(a.model, max_seq_length=seq, load_in_4bit=True, dtype=None,
                                                       local_files_only=True)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                                 random_state=0, max_seq_length=seq)
        peft_config = None
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=bnb, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": 0})
        tok = AutoTokenizer.from_pretrained(a.model)
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=TARGETS,
                                 task_type="CAUSAL_LM")
    args = DPOConfig(output_dir="/tmp/dpo_bench_trl", per_device_train_batch_size=a.pairs, max_steps=a.steps,
                     learning_rate=5e-6, bf16=True, logging_steps=1, report_to=[], save_strategy="no", beta=0.1,
                     max_length=seq, gradient_checkpointing=not a.no_ckpt, dataloader_num_workers=0)
    torch.cuda.reset_peak_memory_stats()
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      peft_config=peft_config, callbacks=[timer])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", required=True, choices=["qfine", "trl", "unsloth"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--completion-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--offload", action="store_true", help="qfine: checkpointed layer inputs in pinned host memory")
    ap.add_argument("--no-ckpt", action="store_true", help="no gradient checkpointing")
    ap.add_argument("--mode", default="dpo", choices=["dpo", "dpo-precompute", "sft"],
                    help="qfine: DPO with the live reference, with precomputed reference log-probs, or the SFT loss "
                         "on the same rows (the memory baseline of a DPO step)")
    a = ap.parse_args()
    import torch

    rows = texts(a.pairs * a.steps, a.prompt_len, a.completion_len)
    timer = StepTimer()
    rec = {"impl": a.impl, "mode": a.mode, "pairs": a.pairs, "prompt": a.prompt_len, "completion": a.completion_len,
           "offload": a.offload, "ckpt": not a.no_ckpt, "device": torch.cuda.get_device_name(0)}
    try:
        trainer = qfine_trainer(a, rows, timer) if a.impl == "qfine" else trl_trainer(a, rows, timer, a.impl == "unsloth")
        trainer.train()
        steady = timer.times[2:] or timer.times
        step_s = statistics.median(steady)
        tokens = 2 * a.pairs * (a.prompt_len + a.completion_len)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        rec.update(step_s=round(step_s, 4), tok_s=round(tokens / step_s, 1),
                   peak_alloc_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   peak_res_GiB=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                   first_loss=round(losses[0], 4) if losses else None, steps=len(timer.times),
                   precompute_s=getattr(a, "precompute_s", None))
    except Exception as e:  # noqa: BLE001 - a peer failing is a result to record, not a crash of the bench
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print("RESULT " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
