"""qfine sweep on the tiny model: trials scored on eval data, pruning, one base load for all trials,
best.yaml, the report, a sweep continued after its process died mid-trial, and bad spaces."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import FACT, tiny_config, write_jsonl
from qfine import config as C
from qfine.cli import main
from qfine.util.errors import QfineError

SPACE = {"train.learning_rate": {"low": 1e-4, "high": 5e-2, "log": True}, "lora.r": [2, 4, 8]}


def _setup(tmp_path, tiny_dir, **space):
    rows = [{"messages": [FACT[0], {"role": "assistant", "content": f"You were born on day {i}."}]} for i in range(24)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = tiny_config(tiny_dir, data, tmp_path / "sweep", max_steps=8, save_steps=100, report_samples=0)
    cfg.data.eval_ratio = 0.25
    cfg.train.eval_steps = 2
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space or SPACE))
    return cfg, space_file


def _states(sweep_dir):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="qfine-sweep",
                              storage=JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal"))))
    return study, [t.state.name for t in study.get_trials()]


def test_sweep_trials_prunes_and_writes_the_best(tmp_path, tiny_dir, monkeypatch, capsys):
    import qfine.training.run as run
    from qfine.sweep import sweep

    loads = []
    real = run.load_model
    monkeypatch.setattr(run, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    cfg, space = _setup(tmp_path, tiny_dir)
    out = sweep(cfg, str(space), trials=6)
    printed = capsys.readouterr().out
    study, states = _states(out)
    assert states.count("COMPLETE") + states.count("PRUNED") == 6 and "FAIL" not in states, states
    assert len(loads) == 1  # one base for every trial
    assert "PRUNED" in states, states  # lr spans 2.5 decades: the median pruner stops the bad ones
    assert "pruned at step" in printed
    for t in study.get_trials():
        assert (out / f"trial-{t.number:03d}" / "adapter" / "adapter_model.safetensors").is_file()
        assert t.params["lora.r"] in (2, 4, 8) and 1e-4 <= t.params["train.learning_rate"] <= 5e-2
    best = study.best_trial
    again = C.load_yaml(out / "best.yaml")
    assert again.lora.r == best.params["lora.r"] and again.train.learning_rate == best.params["train.learning_rate"]
    logged = [json.loads(x) for x in (out / f"trial-{best.number:03d}" / "metrics.jsonl").read_text().splitlines()]
    assert best.value == [r["eval_loss"] for r in logged if "eval_loss" in r][-1]  # the trial's last eval
    if best.params["lora.r"] != 8:  # each trial's adapter has its own rank: a fresh adapter per trial
        cfg_saved = json.loads((out / f"trial-{best.number:03d}" / "adapter" / "adapter_config.json").read_text())
        assert cfg_saved["r"] == best.params["lora.r"]
    page = (out / "report.html").read_text()
    assert "pruned" in page and f"Best: trial {best.number}" in page and "<svg" in page
    assert json.loads((out / "sweep.json").read_text())["metric"] == "eval_loss"


def test_sweep_continues_after_its_process_died_mid_trial(tmp_path, tiny_dir, monkeypatch):
    """A trial running when the process dies stays RUNNING in the journal; the same command again marks
    it failed, tries its parameters again, keeps the finished trials, and ends with the asked-for count."""
    from transformers import TrainerCallback

    import qfine.sweep as sw

    cfg, space = _setup(tmp_path, tiny_dir)
    real = sw._pruning_callback
    calls = []

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if len(calls) == 3 and state.global_step == 3:
                raise KeyboardInterrupt  # what a kill leaves behind: no tell(), the trial stays RUNNING

    def with_death(trial, metric):
        calls.append(trial.number)
        cb = real(trial, metric)
        die = Die()
        cb.on_step_end = die.on_step_end
        return cb

    monkeypatch.setattr(sw, "_pruning_callback", with_death)
    with pytest.raises(KeyboardInterrupt):
        sw.sweep(cfg, str(space), trials=3)
    study, states = _states(tmp_path / "sweep")
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"], states
    interrupted = study.get_trials()[2].params
    monkeypatch.setattr(sw, "_pruning_callback", real)
    sw.sweep(cfg, str(space), trials=4)
    study, states = _states(tmp_path / "sweep")
    assert states[:3] == ["COMPLETE", "COMPLETE", "FAIL"], states
    finished = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 and finished[2].params == interrupted  # retried first
    assert finished[2].user_attrs["retry_of"] == 2
    # the continued process samples anew: not the first process's start-up points again
    assert finished[3].params not in [t.params for t in finished[:3]], [t.params for t in finished]


def test_bad_spaces_and_settings_are_named(tmp_path, tiny_dir, capsys):
    cfg, space = _setup(tmp_path, tiny_dir, **{"lora.rank": [4, 8]})
    with pytest.raises(QfineError, match=r"space.yaml: lora.rank: no field 'rank' in lora options"):
        __import__("qfine.sweep").sweep.load_space(space)
    space.write_text("train.learning_rate: {low: 1.0e-3}\n")
    assert main(["sweep", "--space", str(space), "--model", str(tiny_dir), "--data", cfg.data.path,
                 "--output-dir", str(tmp_path / "s"), "--eval-ratio", "0.25"]) == 2
    assert "a range needs low and high" in capsys.readouterr().err
    space.write_text("lora.r: [4, 8]\n")
    assert main(["sweep", "--space", str(space), "--model", str(tiny_dir), "--data", cfg.data.path,
                 "--output-dir", str(tmp_path / "s")]) == 2
    assert "needs eval data" in capsys.readouterr().err
    # a setting no trial can run with stops the sweep at its first trial, naming the trial and the cause
    assert main(["sweep", "--space", str(space), "--model", str(tiny_dir), "--data", cfg.data.path,
                 "--output-dir", str(tmp_path / "s2"), "--eval-ratio", "0.25", "--max-steps", "4",
                 "--eval-steps", "3", "--save-steps", "100"]) == 2
    err = capsys.readouterr().err
    assert "sweep trial 0 (lora.r=" in err and "must be a multiple of train.eval_steps" in err, err


def test_sigterm_stops_a_sweep_at_a_step_and_the_same_command_continues_it(tmp_path, tiny_dir, monkeypatch):
    """SIGTERM in trial 1: that trial stops at a step with a sealed checkpoint, the sweep raises
    Stopped (exit 143) naming how to continue and writes what the finished trials found; the trial
    stays RUNNING, so the next sweep retries it."""
    import os
    import signal

    from transformers import TrainerCallback

    import qfine.sweep as sw
    from qfine.training.resume import why_incomplete
    from qfine.training.stop import Stopped

    cfg, space = _setup(tmp_path, tiny_dir)
    real = sw._pruning_callback

    class Term(TrainerCallback):
        def __init__(self, number):
            self.number = number

        def on_step_end(self, args, state, control, **kwargs):
            if self.number == 1 and state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    def with_term(trial, metric):
        cb = real(trial, metric)
        cb.on_step_end = Term(trial.number).on_step_end
        return cb

    monkeypatch.setattr(sw, "_pruning_callback", with_term)
    with pytest.raises(Stopped, match="run the same qfine sweep command to continue") as e:
        sw.sweep(cfg, str(space), trials=3)
    assert e.value.exit_code == 143 and "stopped by SIGTERM at step 3 of 8" in str(e.value)
    assert why_incomplete(tmp_path / "sweep" / "trial-001" / "checkpoints" / "checkpoint-3") is None
    assert (tmp_path / "sweep" / "report.html").is_file()
    _, states = _states(tmp_path / "sweep")
    assert states == ["COMPLETE", "RUNNING"], states
    assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGTERM) != signal.SIG_IGN
    monkeypatch.setattr(sw, "_pruning_callback", real)
    sw.sweep(cfg, str(space), trials=3)
    _, states = _states(tmp_path / "sweep")
    assert states[:2] == ["COMPLETE", "FAIL"] and states.count("COMPLETE") + states.count("PRUNED") == 3, states


def test_the_direction_follows_the_metric():
    """Rewards and scores are maximised, losses minimised: a GRPO sweep on eval_reward (its objective's
    default metric) or on one reward's mean climbs, and a preference run's rejected reward is not a score."""
    from qfine.objectives import objective_of
    from qfine.sweep import maximized

    assert maximized("eval_reward") and maximized("eval_rewards/answer_format/mean")
    assert maximized("eval_accuracy") and maximized("eval_rewards/accuracies")
    assert not maximized("eval_loss") and not maximized("eval_rewards/rejected")
    cfg = C.RunConfig()
    cfg.train.objective = "grpo"
    assert objective_of(cfg).metric == "eval_reward"
