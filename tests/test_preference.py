"""Preference objectives (DPO, SimPO, ORPO, KTO): rows, masks, the loss against TRL's, the chunked
log-probabilities, no second model, training and resuming through qfine.train."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch
from transformers import AutoTokenizer, TrainingArguments

import qfine
from helpers import lora_model, tiny_config, write_jsonl
from qfine.config import DataConfig
from qfine.fast.loss import linear_token_logprobs
from qfine.objectives import pref_data, pref_loss
from qfine.objectives.preference import PreferenceTrainer, sequence_logps
from qfine.util.errors import QfineError

WORDS = ["cats", "dogs", "rain", "tea", "maps", "boats", "songs", "trees"]


def _pairs(words=WORDS):
    return [{"prompt": f"Say something about {w}.", "chosen": f"Yes! {w} is great.", "rejected": f"No. {w}."}
            for w in words]


def _decode_scored(tok, ids, labels):
    return tok.decode([i for i, label in zip(ids, labels) if label != -100])


def test_every_pair_shape_gives_the_same_tokens_and_scores_only_the_reply(tiny_dir, tmp_path):
    """A string pair, a message-list prompt, UltraFeedback's (prompt + whole conversations) and
    HH-RLHF's (whole conversations, no prompt column) tokenize identically; labels cover the reply + EOS."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    user = [{"role": "user", "content": "Name a colour."}]
    shapes = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I refuse."},
        {"prompt": user, "chosen": "Blue.", "rejected": "I refuse."},
        {"prompt": "Name a colour.", "chosen": user + [{"role": "assistant", "content": "Blue."}],
         "rejected": user + [{"role": "assistant", "content": "I refuse."}]},
        {"chosen": user + [{"role": "assistant", "content": "Blue."}],
         "rejected": user + [{"role": "assistant", "content": "I refuse."}]},
    ]
    rows, stats = pref_data.encoded_pairs(write_jsonl(tmp_path / "p.jsonl", shapes), tok, DataConfig())
    assert stats.rows == 4 and len({json.dumps(r) for r in rows}) == 1
    r = rows[0]
    assert _decode_scored(tok, r["chosen_ids"], r["chosen_labels"]) == "Blue." + tok.eos_token
    assert _decode_scored(tok, r["rejected_ids"], r["rejected_labels"]) == "I refuse." + tok.eos_token
    prompt_len = r["chosen_labels"].index(r["chosen_ids"][r["chosen_labels"].index(next(
        x for x in r["chosen_labels"] if x != -100))])
    assert r["chosen_ids"][:prompt_len] == r["rejected_ids"][:prompt_len]  # one shared prompt


@pytest.mark.parametrize("row,message", [
    ({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}, "chosen and rejected are identical"),
    ({"prompt": "Hi", "chosen": "Yes."}, "no rejected column"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]},
     "the conversations of chosen and rejected have different prompts"),
    ({"prompt": "word " * 600, "chosen": "Yes.", "rejected": "No."}, "the prompt alone has"),
])
def test_bad_pairs_are_named_by_file_and_line_and_can_be_skipped(tiny_dir, tmp_path, row, message):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(WORDS[:2]) + [row])
    with pytest.raises(QfineError, match=f"p.jsonl:3: {message}"):
        pref_data.encoded_pairs(path, tok, DataConfig(max_seq_len=256))
    rows, stats = pref_data.encoded_pairs(path, tok, DataConfig(max_seq_len=256, on_bad_rows="skip"))
    assert len(rows) == 2 and stats.skipped == 1 and message in stats.first_skip


def test_chunked_token_logprobs_equal_the_full_logits_and_their_gradient():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    got = linear_token_logprobs(h, w, labels)
    logp = (h @ w.t()).log_softmax(-1)[:, :-1].gather(2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want = torch.nn.functional.pad(logp * (labels[:, 1:] != -100), (0, 1))
    assert torch.allclose(got, want, atol=1e-12)
    weights = torch.randn(2, 7, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * weights).sum(), h)
    (g_want,) = torch.autograd.grad((want * weights).sum(), h)
    assert torch.allclose(g_got, g_want, atol=1e-12)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_dpo_loss_and_gradients_equal_trl_dpo_trainer_on_the_same_batch(tiny_dir, tmp_path):
    """Same adapter, same batch (chosen rows then rejected rows), fp32 on a 4-bit base: qfine's DPO loss
    and every LoRA gradient equal TRL's DPOTrainer (the reference being the adapter switched off in both)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = lora_model(tiny_dir, "nf4", compute_dtype="fp32")
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter, so policy and reference differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    rows, _ = pref_data.encoded_pairs(write_jsonl(tmp_path / "p.jsonl", _pairs(WORDS[:3])), tok, DataConfig())
    batch = pref_data.PairCollator(tok.pad_token_id)(rows)

    dummy = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to=[], use_cpu=True)
    trl = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    # TRL keeps a copy of an adapter it is given as the reference ("ref"); without it TRL's reference is
    # the adapter switched off, as qfine's is for a new adapter
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")
    for p in model.parameters():  # TRL casts a quantized model's adapter to bf16; compare in fp32
        if p.requires_grad:
            p.data = p.data.float()
    trl_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                 "completion_mask": (batch["labels"] != -100).long()}
    want = trl._compute_loss(model, trl_batch, False)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    ours = PreferenceTrainer(model=model, args=args, data_collator=pref_data.PairCollator(tok.pad_token_id),
                             kind="dpo", beta=0.1, gamma=0.0, reference=True)
    got, metrics = ours.preference_loss(model, batch)
    got.backward()
    got_grads = _grads(model)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    assert metrics["rewards/margins"] != 0  # the adapter moved the policy away from the reference
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=1e-5, atol=1e-7), name


def test_losses_match_their_formulas_on_known_numbers():
    lc, lr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    loss, m = pref_loss.dpo(lc, lr, rc, rr, beta=0.5)
    assert math.isclose(loss.item(), -math.log(1 / (1 + math.exp(-0.5 * ((-3 + 4) - (-5 + 4.5))))), rel_tol=1e-6)
    assert m["rewards/accuracies"] == 1.0
    n = torch.tensor([2.0])
    loss, _ = pref_loss.simpo(lc, lr, n, n * 2, beta=2.0, gamma=0.5)
    assert math.isclose(loss.item(), -math.log(1 / (1 + math.exp(-(2.0 * (-1.5 + 1.25) - 0.5)))), rel_tol=1e-6)
    loss, m = pref_loss.orpo(lc, lr, n, n * 2, beta=0.1)
    avg_c, avg_r = -1.5, -1.25
    odds = (avg_c - avg_r) - (math.log1p(-math.exp(avg_c)) - math.log1p(-math.exp(avg_r)))
    assert math.isclose(loss.item(), 1.5 - 0.1 * math.log(1 / (1 + math.exp(-odds))), rel_tol=1e-6)
    logp, ref = torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -2.0])
    loss, m = pref_loss.kto(logp, ref, torch.tensor([True, False]), torch.tensor([-3.0]), torch.tensor([-3.2]), 0.1)
    z = 0.2
    want = ((1 - 1 / (1 + math.exp(-0.1 * (0.5 - z)))) + (1 - 1 / (1 + math.exp(-0.1 * (z + 1.0))))) / 2
    assert math.isclose(loss.item(), want, rel_tol=1e-6) and math.isclose(m["kl"], z, rel_tol=1e-5)


def _four_bit_weights() -> int:
    import bitsandbytes as bnb
    return sum(1 for o in gc.get_objects() if isinstance(o, bnb.nn.Params4bit))


def test_a_dpo_run_holds_no_second_model_and_learns_the_pairs(tiny_dir, tmp_path):
    """The 4-bit weight tensors alive while DPO trains are the base's alone; the reward accuracy on the
    training pairs reaches 1 and the margin grows; metrics.jsonl and TensorBoard get the rewards."""
    from transformers import TrainerCallback

    counts = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            gc.collect()
            counts.append(_four_bit_weights())

    cfg = tiny_config(tiny_dir, write_jsonl(tmp_path / "p.jsonl", _pairs()), tmp_path / "run", max_steps=12,
                      objective="dpo", report_samples=0)
    gc.collect()
    before = _four_bit_weights()
    from qfine.training.run import train
    run = train(cfg, callbacks=[Count()])
    base_layers = 2 * 7  # the tiny model: 2 decoder layers × 7 projections
    assert set(counts) == {before + base_layers}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x and "rewards/accuracies" in x]
    assert math.isclose(steps[0]["loss"], math.log(2), rel_tol=1e-3)  # policy = reference at step 1
    assert steps[-1]["rewards/accuracies"] == 1.0 and steps[-1]["rewards/margins"] > steps[1]["rewards/margins"] > 0
    assert list((run / "tensorboard").iterdir())


@pytest.mark.parametrize("objective", ["simpo", "orpo", "kto"])
def test_the_other_objectives_learn_the_pairs(tiny_dir, tmp_path, objective):
    rows = _pairs()
    if objective == "kto":
        rows = ([{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
                + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows])
    cfg = tiny_config(tiny_dir, write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "run", max_steps=10,
                      objective=objective, report_samples=0)
    run = qfine.train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "rewards/margins" in x]
    assert lines[-1]["rewards/margins"] > lines[0]["rewards/margins"] + 0.1
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_objective_names_are_checked(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, write_jsonl(tmp_path / "p.jsonl", _pairs()), tmp_path / "run", objective="dpx")
    with pytest.raises(QfineError, match=r"train.objective must be auto or one of .*not 'dpx' \(did you mean dpo\?\)"):
        qfine.train(cfg)


def test_sequence_logps_of_the_reference_are_the_base_model_s(tiny_dir):
    """The reference pass (adapter off) gives what the model without any adapter gives."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = lora_model(tiny_dir, "nf4", compute_dtype="fp32")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.tensor([tok.encode("Hello there, how are you?")])
    labels = ids.clone()
    labels[:, :2] = -100
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with model.disable_adapter():
            base, _ = sequence_logps(model, ids, mask, labels)
        adapted, count = sequence_logps(model, ids, mask, labels)
        logits = model.get_base_model()(ids).logits  # adapter on: the model's own logits path
    full = logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(-1)[:, 1:].sum()
    assert torch.allclose(adapted, full.reshape(1), rtol=1e-5) and count.item() == ids.shape[1] - 2
    assert not torch.allclose(base, adapted)


def _eval_rows(capsys, target, data) -> dict[str, tuple[float, float]]:
    """``qfine eval TARGET --data PAIRS`` → {row: (preference accuracy %, margin)} read from its table."""
    from qfine.cli import main

    capsys.readouterr()
    assert main(["eval", str(target), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("base", "base+adapter", "merged"):
            rows[parts[0]] = (float(parts[1]), float(parts[2]))
    return rows


@pytest.mark.slow
def test_bundled_model_learns_a_preference_it_lacks_through_the_cli(tmp_path, bundled_dir, capsys):
    """examples/dpo-default.yaml through qfine's commands: on held-out pairs (other topics, other question
    forms) the preference accuracy goes from the base's to >= 90 %, and the greedy answers to held-out
    prompts open with the preferred greeting (2 of 3 at least; the base's never) from the run, the exact
    merge and a q8_0 GGUF (through qfine generate, and through llama.cpp where installed). SimPO, ORPO and
    KTO are trained on the same preference and their held-out accuracy printed and asserted."""
    from pathlib import Path

    from qfine.cli import main
    from qfine.export import verify as llamacpp

    root = Path(__file__).resolve().parents[1]
    test_pairs = root / "examples/data/greeting-test.jsonl"
    prompts = ["Could you describe comets briefly?", "Say a few words about penguins.",
               "Could you describe bridges briefly?"]
    reached = {}
    for objective in ("dpo", "simpo", "orpo", "kto"):
        run = tmp_path / objective
        assert main(["train", str(root / f"examples/{objective}-default.yaml"), "--output-dir", str(run),
                     "--report-samples", "0"]) == 0
        rows = _eval_rows(capsys, run, test_pairs)
        reached[objective] = rows
        assert rows["base+adapter"][0] >= 90 and rows["merged"][0] >= 90, (objective, rows)
        if objective != "dpo":
            continue
        assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
        assert main(["export", str(run), "--quant", "q8_0", "--out", str(tmp_path / "dpo.gguf")]) == 0
        answers = {}
        for target in (run, tmp_path / "merged", tmp_path / "dpo.gguf", "default"):
            name = Path(str(target)).name
            for prompt in prompts:
                capsys.readouterr()
                assert main(["generate", str(target), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
                answers.setdefault(name, []).append(capsys.readouterr().out.strip())
        # greedy answers to held-out prompts: the base never opens with the greeting, the trained model
        # (run, exact merge, GGUF) does for most of them
        assert not any(a.startswith("Ahoy") for a in answers["default"]), answers
        for name in (run.name, "merged", "dpo.gguf"):
            assert sum(a.startswith("Ahoy!") for a in answers[name]) >= 2, (name, answers)
        if llamacpp.runtime_dir() is not None:  # the DPO GGUF in llama.cpp itself
            tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
            chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in prompts]
            got = llamacpp.llamacpp({"model": str(tmp_path / "dpo.gguf"), "tokenize": [],
                                     "generate": [{"prompt": c, "max_tokens": 12} for c in chats]})["generated"]
            answers["llama.cpp dpo.gguf"] = got
            assert sum(a.strip().startswith("Ahoy!") for a in got) >= 2, answers
    with capsys.disabled():
        print("\n[preference] held-out pairs, (accuracy %, margin nats):")
        for objective, rows in reached.items():
            print(f"  {objective}: " + ", ".join(f"{k} {v[0]:.0f} % / {v[1]:.2f}" for k, v in rows.items()))
        print(f"  dpo answers: {answers}")


@pytest.mark.parametrize("reference", ["live", pytest.param("precompute", marks=pytest.mark.slow)])
def test_a_killed_dpo_run_resumes_on_the_uninterrupted_curve(tiny_dir, tmp_path, reference):
    """SIGKILL `qfine train --objective dpo` once checkpoint-4 is sealed, resume it: every step's loss and
    reward margin equal the uninterrupted run's (CPU: 1e-6). live: the reference is recomputed from the
    same base with the adapter off; precompute: the resumed run reads the stored log-probabilities (the
    file is not written again)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from qfine.training.resume import SEAL

    data = write_jsonl(tmp_path / "p.jsonl", _pairs() * 2)
    common = ["--model", str(tiny_dir), "--data", str(data), "--objective", "dpo", "--max-steps", "8",
              "--save-steps", "2", "--batch-size", "4", "--learning-rate", "5e-3", "--lr-scheduler", "cosine",
              "--lora-r", "8", "--lora-alpha", "16", "--report-samples", "0", "--reference-logps", reference]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def args(name):
        return [sys.executable, "-m", "qfine", "train", *common, "--output-dir", str(tmp_path / name)]

    assert subprocess.run(args("full"), env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(args("part"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    seal = tmp_path / "part" / "checkpoints" / "checkpoint-4" / SEAL
    deadline = time.time() + 300
    while not seal.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = tmp_path / "part" / "reference_logps.safetensors"
    assert stored.is_file() is (reference == "precompute")
    written = stored.stat().st_mtime_ns if stored.is_file() else None
    done = subprocess.run(args("part") + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    if reference == "precompute":
        assert "reference log-probabilities read from" in done.stdout and stored.stat().st_mtime_ns == written

    def curve(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["rewards/margins"]) for r in rows if "loss" in r]

    full, resumed = curve("full"), curve("part")
    assert [s for s, _, _ in resumed] == list(range(1, 9))
    tol = 1e-2 if torch.cuda.is_available() else 1e-6
    for (_, loss, margin), (_, want_loss, want_margin) in zip(resumed, full):
        assert abs(loss - want_loss) <= tol * max(abs(want_loss), 1e-3)
        assert abs(margin - want_margin) <= tol * max(abs(want_margin), 1e-3)


def test_precomputed_reference_log_probs_give_the_live_curve(tiny_dir, tmp_path, capsys):
    """The stored reference log-probabilities are the live reference pass's: a DPO run with
    train.reference_logps precompute follows the live run's loss, margins and reference log-probs (CPU
    fp32, 1e-5), with one forward per step instead of two; SimPO (no reference) refuses it by name."""
    from qfine.training import train

    data = write_jsonl(tmp_path / "p.jsonl", _pairs() * 2)
    rows = {}
    for mode in ("live", "precompute"):
        cfg = tiny_config(tiny_dir, data, tmp_path / mode, max_steps=6, report_samples=0)
        cfg.train.objective, cfg.train.reference_logps, cfg.train.learning_rate = "dpo", mode, 5e-3
        cfg.model.compute_dtype = "fp32"
        train(cfg)
        rows[mode] = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        rows[mode] = [r for r in rows[mode] if "loss" in r]
    assert "computed once and stored in" in capsys.readouterr().out
    assert len(rows["live"]) == len(rows["precompute"]) == 6
    tol = 1e-3 if torch.cuda.is_available() else 1e-5  # CUDA: batches of other shapes round differently
    for live, pre in zip(rows["live"], rows["precompute"]):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen"):
            assert abs(live[key] - pre[key]) <= tol * max(1.0, abs(live[key])), (key, live[key], pre[key])
    for objective in ("simpo",):
        cfg = tiny_config(tiny_dir, data, tmp_path / objective, max_steps=1, report_samples=0)
        cfg.train.objective, cfg.train.reference_logps = objective, "precompute"
        with pytest.raises(QfineError, match="reference_logps precompute serves dpo"):
            train(cfg)


def test_dpo_from_an_sft_run_uses_that_adapter_as_its_reference(tiny_dir, tmp_path, fact_file):
    """--init-adapter RUN: the new adapter starts as RUN's and RUN's adapter, frozen, is the reference,
    so the first DPO loss is log 2 exactly (policy = reference) although the adapter is far from the base;
    the saved adapter is the trained one alone; other LoRA settings are refused by name."""
    sft = qfine.train(tiny_config(tiny_dir, fact_file, tmp_path / "sft", max_steps=6, report_samples=0))
    pairs = write_jsonl(tmp_path / "p.jsonl", _pairs())
    cfg = tiny_config(tiny_dir, pairs, tmp_path / "dpo", max_steps=4, objective="dpo", report_samples=0,
                      init_adapter=str(sft))
    run = qfine.train(cfg)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"rewards/margins"' in x]
    assert math.isclose(steps[0]["loss"], math.log(2), rel_tol=1e-6) and steps[0]["rewards/margins"] == 0
    assert steps[-1]["rewards/margins"] > 0
    assert not (run / "adapter" / "reference").exists()
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8

    cfg = tiny_config(tiny_dir, pairs, tmp_path / "bad", objective="dpo", init_adapter=str(sft))
    cfg.lora.r = 4
    with pytest.raises(QfineError, match=r"train.init_adapter .*adapter: its LoRA settings differ \(r 8 vs this run's 4"):
        qfine.train(cfg)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_on_the_fast_path_the_reference_runs_the_fused_layers_and_the_first_loss_is_log_2(tiny_dir, tmp_path,
                                                                                           monkeypatch, device):
    """With the fused layers swapped in, the reference pass (no grad, adapter off) goes through them too,
    so at the start (B = 0) policy and reference log-probabilities agree to the compute dtype's rounding
    and DPO's loss is log 2; the fused projections are called in both passes."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from qfine.fast import apply_fast_path
    from qfine.fast import swap as fast_swap

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    dtype = "bf16" if device == "cuda" else "fp32"
    model = lora_model(tiny_dir, "nf4", device=device, compute_dtype=dtype)
    with torch.no_grad():  # a new adapter: B = 0, the policy is the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert apply_fast_path(model).fused == 2
    model.train()
    rows, _ = pref_data.encoded_pairs(write_jsonl(tmp_path / "p.jsonl", _pairs(WORDS[:4])), tok, DataConfig())
    batch = {k: v.to(device) for k, v in pref_data.PairCollator(tok.pad_token_id)(rows).items()}
    calls = []
    real = fast_swap.NormQKV

    class Counting:
        @staticmethod
        def apply(*args):
            calls.append(torch.is_grad_enabled())
            return real.apply(*args)

    monkeypatch.setattr(fast_swap, "NormQKV", Counting)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=device == "cpu",
                             bf16=device == "cuda")
    trainer = PreferenceTrainer(model=model, args=args, data_collator=pref_data.PairCollator(tok.pad_token_id),
                                kind="dpo", beta=0.1, gamma=0.0, reference=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss, metrics = trainer.preference_loss(model, batch)
    assert calls.count(True) == 2 and calls.count(False) == 2  # policy (with grad) and reference, 2 layers each
    tolerance = 1e-5 if device == "cpu" else 2e-3
    assert abs(loss.item() - math.log(2)) <= tolerance, (loss.item(), metrics)


def test_data_preview_shows_a_pair_with_its_scored_tokens_marked(tiny_dir, tmp_path, capsys):
    from qfine.cli import main

    path = write_jsonl(tmp_path / "p.jsonl", _pairs(WORDS[:3]))
    assert main(["data", "preview", str(path), "--model", str(tiny_dir), "--example", "1"]) == 0
    out = capsys.readouterr().out
    assert "preference pairs (prompt, chosen, rejected), 3 rows" in out
    assert out.count("⟦") == 3  # the legend line and the two replies: nothing of the prompt
    assert "⟦Yes! dogs is great.<|im_end|>⟧" in out and "⟦No. dogs.<|im_end|>⟧" in out
