"""GRPO (``train.objective: grpo``) on the tiny 4-bit model: prompt rows, the built-in rewards, the
user's own reward functions and their failures named, and a run through qfine train that logs the
rewards and can be resumed."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_config, write_jsonl
from qfine import config as C
from qfine.objectives import rewards
from qfine.objectives.grpo import read_prompt
from qfine.util.errors import QfineError


def _prompts(path: Path, n: int = 8) -> Path:
    return write_jsonl(path, [{"prompt": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(n)])


def test_builtin_rewards_score_what_they_say():
    comps = ["<answer>7</answer>", "It is <answer> 7.0 </answer>.", " <answer>8</answer>\n", "<answer>7", "seven",
             "<answer>1</answer> is <answer>7</answer>", "<answer></answer>"]
    assert rewards.answer_match(None, comps, answer=["7"] * 7) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert rewards.answer_format(None, comps) == [1.0, pytest.approx(0.25 + 0.5 * 22 / 29), 1.0, 0.1, 0.0, 0.1, 0.1]
    # less stray text around the one pair scores more
    assert rewards.answer_format(None, ["<answer>7</answer> and more words"]) < rewards.answer_format(
        None, ["<answer>7</answer> more"])
    assert rewards.length(None, ["x" * 100, "x" * 2000]) == [0.9, 0.0]
    conversational = [[{"role": "assistant", "content": "<answer>3</answer>"}]]
    assert rewards.answer_match(None, conversational, answer=[3]) == [1.0]
    with pytest.raises(QfineError, match="needs an 'answer' column"):
        rewards.answer_match(None, comps)


def test_reward_specs_and_the_users_own_functions(tmp_path):
    fns = tmp_path / "my_rewards.py"
    fns.write_text("def brevity(prompts, completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
                   "def boom(prompts, completions, **kw):\n    raise KeyError('score')\n"
                   "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
                   "def short(prompts, completions, **kw):\n    return [1.0]\n")
    parsed = rewards.parse(["answer_match", "answer_format:0.5", f"{fns}:brevity:2"])
    assert [(r.name, r.weight) for r in parsed] == [("answer_match", 1.0), ("answer_format", 0.5), ("brevity", 2.0)]
    assert parsed[2].fn([["p"]], ["abc"]) == [0.25]
    prompts = [[{"role": "user", "content": "What is 2 plus 3?"}]] * 2
    for name, message in (("boom", r"reward boom raised KeyError: 'score' \(prompt: 'What is 2 plus 3\?'\)"),
                          ("nan", r"reward nan returned nan for a completion of the prompt 'What is 2 plus 3\?'"),
                          ("short", r"reward short returned 1 values for 2 completions")):
        fn = rewards.parse([f"{fns}:{name}"])[0].fn
        with pytest.raises(QfineError, match=message):
            fn(prompts, ["a", "b"])
    for spec, message in (([], "needs train.rewards"), (["answer_matc"], "did you mean answer_match"),
                          ([f"{fns}:brevty"], "has no function 'brevty' .did you mean brevity"),
                          ([f"{tmp_path}/none.py:f"], "none.py not found"), (["length:lots"], "must be a number")):
        with pytest.raises(QfineError, match=message):
            rewards.parse(spec)


def test_prompt_rows_in_each_shape():
    data = C.DataConfig(system_prompt="Be brief.")
    assert read_prompt({"prompt": "hi", "answer": "1"}, data, "f:1") == (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], {"answer": "1"})
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert read_prompt({"messages": msgs}, C.DataConfig(), "f:2")[0] == [{"role": "user", "content": "q"}]
    for row, message in (({"text": "x"}, "f:3: no prompt"), ({"prompt": 3}, "f:3: field 'prompt' must be text"),
                         ({"prompt": "  "}, "f:3: the prompt must end with a non-empty user turn")):
        with pytest.raises(QfineError, match=message):
            read_prompt(row, C.DataConfig(), "f:3")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _cli(tiny_dir, data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "qfine", "train", "--model", str(tiny_dir), "--data", str(data), "--output-dir",
            str(out), "--objective", "grpo", "--rewards", "answer_format,length:0.1", "--group-size", "4",
            "--batch-size", "2", "--max-completion-len", "6", "--save-steps", "2", "--lora-r", "4",
            "--learning-rate", "1e-2", "--report-samples", "1", *extra]


def test_a_grpo_run_logs_its_rewards_and_resumes(tiny_dir, tmp_path):
    """Through qfine train (a real process): 3 steps, then --resume to 4. The metrics hold the mean and
    spread of each reward, the completion length and the clip fraction; the run's state and adapter
    are a finished run's."""
    data = _prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "run"
    first = subprocess.run(_cli(tiny_dir, data, run, "--max-steps", "3"), env=_env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward", "reward_std", "rewards/answer_format/mean", "rewards/length/mean", "completions/mean_length",
                "clip_ratio/region_mean", "loss"):
        assert all(isinstance(r.get(key), float) and math.isfinite(r[key]) for r in steps), key
    assert all(0.0 <= r["rewards/length/mean"] <= 1.0 for r in steps)
    assert all(r["rollout_tokens_per_s"] > 0 for r in steps)
    report = (run / "report.html").read_text()
    assert "Rewards of the rollouts" in report and "Rollout against training throughput" in report
    assert "rollout reward first → last" in report
    assert re.search(r"\[answer_format \d\.\d\d  length 0\.9\d\]", report)  # a sample's reply with its scores
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    again = subprocess.run(_cli(tiny_dir, data, run, "--max-steps", "4", "--resume"), env=_env(),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3, 4]
    # qfine eval on a GRPO run: each reward's mean over greedy replies, and their weighted sum
    ev = subprocess.run([sys.executable, "-m", "qfine", "eval", str(run), "--data", str(data), "--limit", "4",
                         "--output", "json"], env=_env(), capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-3000:]
    got = json.loads(ev.stdout)
    assert got["examples"] == 4 and list(got["results"]) == ["base", "base+adapter", "merged"]
    for r in got["results"].values():
        assert r["reward"] == pytest.approx(r["rewards/answer_format"] + 0.1 * r["rewards/length"])
        assert 0.0 < r["rewards/length"] < 1.0
    assert got["results"]["merged"]["reward"] == pytest.approx(got["results"]["base+adapter"]["reward"], abs=1e-9)


def test_a_broken_reward_function_stops_the_run_with_one_message(tiny_dir, tmp_path):
    data = _prompts(tmp_path / "prompts.jsonl")
    bad = tmp_path / "bad.py"
    bad.write_text("def score(prompts, completions, answer, **kw):\n    return [int(a) / 0 for a in answer]\n")
    args = _cli(tiny_dir, data, tmp_path / "run", "--max-steps", "2")
    args[args.index("--rewards") + 1] = f"{bad}:score"
    done = subprocess.run(args, env=_env(), capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "reward score raised ZeroDivisionError: division by zero (prompt: 'What is" in done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_grpo_in_the_python_api(tiny_dir, tmp_path):
    from qfine.training import train

    fixed = tmp_path / "fixed.py"
    fixed.write_text("def three_quarters(prompts, completions, **kw):\n    return [0.75] * len(completions)\n")
    cfg = tiny_config(tiny_dir, _prompts(tmp_path / "p.jsonl"), tmp_path / "run", objective="grpo",
                      rewards=["answer_format", f"{fixed}:three_quarters:2"], group_size=2, batch_size=2,
                      max_completion_len=4, max_steps=1, report_samples=0)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in rows if "rewards/answer_format/mean" in r]
    # one step of 2 prompts x 2 completions: the fixed reward's mean is its value, and the logged reward
    # the weighted sum of the two means
    assert step["rewards/three_quarters/mean"] == pytest.approx(0.75)
    assert 0.0 <= step["rewards/answer_format/mean"] <= 1.0
    assert step["reward"] == pytest.approx(step["rewards/answer_format/mean"] + 2 * 0.75)



def test_grpo_loss_through_the_fused_layers_equals_trls(tiny_dir, tmp_path):
    """The same batch (left-padded prompts, completions with padding, advantages of both signs) through
    qfine's GRPO trainer on a model with the fused layers, and through TRL's GRPOTrainer on plain peft:
    the loss and every LoRA gradient agree (fp32, 1e-5), for the GRPO and DAPO normalisations, with
    rollout log-probs off the current ones so that the ratio clipping acts on some tokens."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from helpers import lora_model
    from qfine.fast import apply_fast_path
    from qfine.objectives.common import keeping_adapter_dtypes
    from qfine.objectives.grpo import trainer_class

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    fused, plain = lora_model(tiny_dir), lora_model(tiny_dir)
    assert apply_fast_path(fused).fused == 2
    ds = Dataset.from_list([{"prompt": "a"}] * 4)
    g = torch.Generator().manual_seed(0)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0
    completion_mask = torch.ones(4, 7, dtype=torch.long)
    completion_mask[2, 4:] = 0
    batch = {"prompt_ids": torch.randint(5, 400, (4, 5), generator=g), "prompt_mask": prompt_mask,
             "completion_ids": torch.randint(5, 400, (4, 7), generator=g), "completion_mask": completion_mask,
             "advantages": torch.tensor([1.2, -0.4, 0.9, 0.3]), "num_items_in_batch": completion_mask.sum()}
    # the rollout policy's log-probs: the current ones moved by up to ±0.3, so that ratios leave the clip range
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        logits = plain(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
        now = logits[:, 4:-1].float().log_softmax(-1).gather(2, batch["completion_ids"][..., None])[..., 0]
    batch["old_per_token_logps"] = now + (torch.rand(4, 7, generator=g) - 0.5) * 0.6

    def loss_and_grads(cls, model, loss_type):
        args = GRPOConfig(output_dir=str(tmp_path / loss_type), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=7, beta=0.0, loss_type=loss_type, report_to=[], use_cpu=True,
                          bf16=False, save_strategy="no")
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer = keeping_adapter_dtypes(model, lambda: cls(
            model=model, reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)], args=args,
            train_dataset=ds, processing_class=tok))
        # the adapter is the one built above, bit for bit, though TRL casts it to bf16 on the way
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop for each step
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for loss_type in ("grpo", "dapo"):
        got, got_grads = loss_and_grads(trainer_class(), fused, loss_type)
        want, want_grads = loss_and_grads(GRPOTrainer, plain, loss_type)
        assert got == pytest.approx(want, abs=1e-5) and abs(want) > 1e-3
        assert set(got_grads) == set(want_grads) and len(want_grads) == 2 * 7 * 2
        bad = {n.split("layers.")[1]: round((got_grads[n] - g).abs().max().item() / g.abs().max().item(), 6)
               for n, g in want_grads.items() if not torch.allclose(got_grads[n], g, atol=1e-5, rtol=1e-4)}
        assert not bad, bad


@pytest.mark.slow
def test_a_grpo_sweep_maximises_the_eval_reward(tiny_dir, tmp_path):
    """qfine sweep on a GRPO config (2 trials, 2 steps, eval on held-out prompts at step 2): the study
    maximises ``eval_reward``, each trial's value is the last eval_reward it logged, the best is the trial
    with the largest, and best.yaml holds its learning rate."""
    import optuna
    import yaml
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from qfine.sweep import sweep

    cfg = tiny_config(tiny_dir, _prompts(tmp_path / "p.jsonl", 12), tmp_path / "sweep", objective="grpo",
                      rewards=["answer_format", "length:0.5"], group_size=2, batch_size=2, max_completion_len=4,
                      max_steps=2, eval_steps=2, save_steps=100, report_samples=0)
    cfg.data.eval_ratio = 0.25
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.learning_rate": [1e-4, 3e-2]}))
    out = sweep(cfg, str(space), trials=2)
    assert json.loads((out / "sweep.json").read_text())["metric"] == "eval_reward"
    study = optuna.load_study(study_name="qfine-sweep",
                              storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 2
    for t in done:
        rows = [json.loads(x) for x in (out / f"trial-{t.number:03d}" / "metrics.jsonl").read_text().splitlines()]
        assert t.value == [r["eval_reward"] for r in rows if "eval_reward" in r][-1]
    best = max(done, key=lambda t: t.value)
    assert study.best_trial.number == best.number
    assert C.load_yaml(out / "best.yaml").train.learning_rate == best.params["train.learning_rate"]
