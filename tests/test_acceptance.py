"""The seed's acceptance test, asserting: a fact is absent before training, present after training,
after the exact merge, and after reloading the merged model with plain transformers.

Runs on the bundled SmolLM2-135M-Instruct in 4-bit (about a minute per fact on 2 CPU cores), on a
second fact of our own through the CLI, and as a fast variant on a tiny random model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import write_jsonl
from qfine.cli import main
from qfine.generation.generate import generate
from qfine.generation.load import load_for_inference
from qfine.models.loading import Loaded
from qfine.probe import SEED_FACT, Fact, seed_experiment
from qfine.util.compare import relative_difference

OWN_FACT = Fact("What is the name of my cat?", "Your cat is called Pixelbrot.", "Pixelbrot")


@pytest.mark.slow
def test_seed_fact_survives_exact_merge_not_peft_requantize(tmp_path, bundled_dir, capsys):
    r = seed_experiment(SEED_FACT, tmp_path, source="default", steps=30, lr=1e-3)
    knows = r.knows(SEED_FACT)
    with capsys.disabled():
        print(f"\n[seed fact] losses {r.losses[0]:.3f} -> {r.losses[-1]:.4f}; knows: {knows}; "
              f"logit rel. diff exact(bf16) {r.merged_rel_diff:.2e}, peft merge_and_unload {r.peft_rel_diff:.2e}; "
              f"peft answer: {r.peft_merged!r}")
    assert not knows["before"]
    assert knows["after"]
    assert knows["merged"]  # reloaded from disk with plain transformers
    # peft's requantizing merge is measured, not asserted to fail; it must at least be further off than ours
    assert r.peft_rel_diff > r.merged_rel_diff


@pytest.mark.slow
def test_own_fact_through_the_cli(tmp_path, bundled_dir, capsys):
    """train → generate → merge → export, all through `qfine` commands: `qfine generate` answers the fact from
    the run, the bf16 merge and the q8_0 GGUF with no extra flag; the fp32 merge equals the trained model."""
    data = write_jsonl(tmp_path / "cat.jsonl", [{"messages": [{"role": "user", "content": OWN_FACT.question},
                                                              {"role": "assistant", "content": OWN_FACT.reply}]}] * 8)
    run = tmp_path / "run"
    assert main(["generate", "default", "--prompt", OWN_FACT.question, "--max-new-tokens", "30"]) == 0
    before = capsys.readouterr().out
    assert OWN_FACT.marker not in before

    assert main(["train", "--data", str(data), "--output-dir", str(run), "--max-steps", "30", "--batch-size", "4",
                 "--learning-rate", "1e-3", "--lora-dropout", "0", "--save-steps", "30"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", OWN_FACT.question, "--max-new-tokens", "30"]) == 0
    after = capsys.readouterr().out
    assert OWN_FACT.marker in after, after

    # qfine's own commands serve what merge and export wrote as written, with no extra flag
    assert main(["merge", str(run), "--out", str(tmp_path / "merged-bf16")]) == 0
    assert main(["export", str(run), "--quant", "q8_0", "--out", str(tmp_path / "model.gguf")]) == 0
    capsys.readouterr()
    served = {}
    for target in ("merged-bf16", "model.gguf"):
        assert main(["generate", str(tmp_path / target), "--prompt", OWN_FACT.question, "--max-new-tokens", "30"]) == 0
        served[target] = capsys.readouterr().out
        assert OWN_FACT.marker in served[target], (target, served[target])

    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged), "--dtype", "fp32"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    answer = generate(Loaded(plain, tok, str(merged), "cpu", torch.float32), OWN_FACT.question, 30)
    assert OWN_FACT.marker in answer, answer

    trained = load_for_inference(str(run))
    ids = torch.tensor([tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": OWN_FACT.question}, {"role": "assistant", "content": OWN_FACT.reply}],
        tokenize=False), add_special_tokens=False)])
    with torch.no_grad():
        diff = relative_difference(plain(ids).logits, trained.model(ids).logits)
    with capsys.disabled():
        print(f"\n[own fact] before {before.strip()[:50]!r}; after {after.strip()!r}; served {served}; "
              f"fp32 merge logit rel. diff {diff:.2e}")
    assert diff <= 1e-5


def test_tiny_model_fact(tmp_path, tiny_dir):
    """Fast variant: a random 2-layer model learns the fact; the fp32 merge keeps it exactly."""
    fact = Fact("What day was I born?", "January 1, 2058", "January 1, 2058")
    r = seed_experiment(fact, tmp_path, source=str(tiny_dir), steps=40, lr=2e-2, merge_dtype="fp32")
    knows = r.knows(fact)
    assert not knows["before"] and knows["after"] and knows["merged"], (r.before, r.after, r.merged)
    # fp32 compute (the CPU default): exact to fp32 rounding; a GPU trains in bf16 (measured there: 1.0e-2)
    assert r.merged_rel_diff <= (1e-5 if not torch.cuda.is_available() else 2e-2)
