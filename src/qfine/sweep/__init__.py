"""``qfine sweep``: hyperparameter search over any config field, backed by Optuna.

One process loads the frozen base once (``train(..., base_cache=)``); each trial adds a fresh adapter,
trains, evaluates and takes the adapter out again. The study lives in the sweep directory as Optuna's
journal file, so a killed sweep continues where it stopped: finished and pruned trials are kept,
a trial that was running when the process died is marked failed and its parameters are tried
again. Layout of ``--output-dir``::

    study.journal   Optuna's journal storage     space.yaml   the search space, as given
    trial-NNN/      each trial's run directory   best.yaml    the best trial's config (qfine train best.yaml)
    sweep.json      metric, direction, trials    report.html  history, importances, the best run

The space is YAML mapping config fields (``section.field``) to a range or a list of choices::

    lora.r: [4, 8, 16]                                    # categorical
    train.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
    lora.dropout: {low: 0.0, high: 0.1}                   # float (int when low and high are ints)
    train.warmup_ratio: {low: 0.0, high: 0.2, step: 0.05}
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import fields
from pathlib import Path

import optuna
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from transformers import TrainerCallback

from qfine import config as C
from qfine.objectives import objective_of
from qfine.sweep.report import render
from qfine.training import train
from qfine.training.run import BaseCache
from qfine.training.stop import Stopped, StopRequest, signals_stop
from qfine.util.errors import QfineError
from qfine.util.files import atomic_write_text

MAXIMIZED = ("accuracy", "accuracies", "margins", "f1", "bleu", "rouge", "chrf", "exact_match")


def maximized(metric: str) -> bool:
    """Whether a larger ``metric`` is better: scores, and a GRPO run's rewards (the weighted sum
    ``eval_reward`` and each reward's ``eval_rewards/NAME/mean``)."""
    grpo_reward = metric == "eval_reward" or (metric.startswith("eval_rewards/") and metric.endswith("/mean"))
    return grpo_reward or any(m in metric for m in MAXIMIZED)


def _field_type(section: str, name: str):
    cls = type(getattr(C.RunConfig(), section)) if section else C.RunConfig
    types = {f.name: f.type for f in fields(cls)}
    if name not in types:
        raise KeyError(name)
    return types[name]


def load_space(path: str | Path) -> dict:
    """The search space of ``path``: {"section.field": spec}, each spec checked against the config."""
    path = Path(path)
    if not path.is_file():
        raise QfineError(f"--space: no such file: {path}")

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QfineError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise QfineError(f"{path}: expected a mapping of config fields (e.g. lora.r: [4, 8, 16])")
    space = {}
    for key, spec in raw.items():
        section, _, name = str(key).rpartition(".")
        if section not in ("", *C.SECTIONS):
            raise QfineError(f"{path}: {key}: no config section {section!r} (sections: {', '.join(C.SECTIONS)})")
        try:
            _field_type(section, name)
        except KeyError:
            raise QfineError(f"{path}: {key}: no field {name!r} in {section or 'the run'} options") from None
        if isinstance(spec, list):
            if not spec:
                raise QfineError(f"{path}: {key}: an empty list of choices")
        elif isinstance(spec, dict):
            if not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "log", "step"}:
                raise QfineError(f"{path}: {key}: a range needs low and high (and optionally log, step), got "
                                 f"{sorted(spec)}")
            if not spec["low"] < spec["high"]:
                raise QfineError(f"{path}: {key}: low must be below high")
        else:
            raise QfineError(f"{path}: {key}: give a list of choices or a {{low, high}} range, not {spec!r}")
        space[str(key)] = spec
    return space


def suggest(trial, space: dict) -> dict:
    """One value per field of ``space`` from the Optuna ``trial``."""
    out = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            out[key] = trial.suggest_categorical(key, spec)
        elif all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("low", "high")) \
                and not isinstance(spec.get("step", 1), float):
            out[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1),
                                         log=bool(spec.get("log", False)))
        else:
            out[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                           log=bool(spec.get("log", False)))
    return out


def apply_params(cfg: C.RunConfig, params: dict) -> C.RunConfig:
    """A copy of ``cfg`` with each ``section.field`` of ``params`` set, coerced to the field's type as a
    flag's value is."""
    overrides = {tuple(key.rpartition(".")[::2]): value for key, value in params.items()}
    return C.apply_overrides(copy.deepcopy(cfg), overrides)


def _rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _pruning_callback(trial, metric: str):
    """A TrainerCallback that reports ``metric`` at each evaluation and stops the run when the pruner
    says so (the run then ends normally: its adapter and report are written, marked pruned)."""

    class Report(TrainerCallback):
        value: float | None = None
        pruned_at: int | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(metric)
            if value is None:
                raise QfineError(f"--metric {metric}: the evaluation reports {', '.join(sorted(metrics or {}))}")
            self.value = float(value)
            trial.report(self.value, state.global_step)
            if trial.should_prune():
                self.pruned_at = state.global_step
                control.should_training_stop = True

    return Report()


def _study(sweep_dir: Path, direction: str, seed: int, pruner: str):

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    chosen = (optuna.pruners.HyperbandPruner() if pruner == "hyperband"
              else optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    study = optuna.create_study(study_name="qfine-sweep", storage=storage, load_if_exists=True, direction=direction,
                                pruner=chosen)
    # seeded by train.seed and by how many trials the study holds: a continued sweep must not replay the
    # first process's random start-up suggestions (it would run trial 0's parameters again)
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    return study


def _recover(study) -> list[int]:
    """Trials left RUNNING by a killed process: marked failed, their parameters queued again."""

    again = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        again.append(t.number)
    return again


def _settings(sweep_dir: Path, metric: str, direction: str, trials: int, space: dict) -> None:
    """sweep.json: refuse to continue a sweep with another metric, direction or space."""
    path = sweep_dir / "sweep.json"
    now = {"metric": metric, "direction": direction, "space": space}
    if path.is_file():
        before = json.loads(path.read_text())
        for key in now:
            if before.get(key) != now[key]:
                raise QfineError(f"{sweep_dir} is a sweep with {key} {before.get(key)!r}, not {now[key]!r}; continue "
                                 "it with its own settings or start a new --output-dir")
    atomic_write_text(path, json.dumps({**now, "trials": trials}, indent=1))


def sweep(cfg: C.RunConfig, space_path: str, trials: int, timeout: float = 0.0, direction: str | None = None,
          metric: str | None = None, pruner: str = "median") -> Path:
    """Run the study in ``cfg.output_dir`` until ``trials`` trials have finished (completed or pruned)
    or ``timeout`` seconds have passed; returns the sweep directory."""


    space = load_space(space_path)
    if not (cfg.data.eval_path or cfg.data.eval_ratio > 0):
        raise QfineError("qfine sweep needs eval data to score trials: pass --eval-data FILE or --eval-ratio 0.1")
    if trials < 1:
        raise QfineError("--trials must be at least 1")
    metric = metric or objective_of(cfg).metric  # by default the objective's own (GRPO: eval_reward)
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    direction = direction or ("maximize" if maximized(metric) else "minimize")
    sweep_dir = Path(cfg.output_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _settings(sweep_dir, metric, direction, trials, space)
    atomic_write_text(sweep_dir / "space.yaml", Path(space_path).read_text())
    study = _study(sweep_dir, direction, cfg.train.seed, pruner)
    for n in _recover(study):
        print(f"[qfine] sweep: trial {n} was interrupted; marked failed, its parameters queued again", flush=True)

    def finished():
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    request = StopRequest()
    try:
        with signals_stop(request):
            _trials(study, cfg, space, sweep_dir, trials, timeout, metric, finished, request)
    except Stopped:
        _write_outputs(study, cfg, sweep_dir, metric, direction)  # what the finished trials found
        raise
    _write_outputs(study, cfg, sweep_dir, metric, direction)
    return sweep_dir


def _trials(study, cfg: C.RunConfig, space: dict, sweep_dir: Path, trials: int, timeout: float, metric: str,
            finished, request: StopRequest) -> None:
    """Ask, train and tell trials until enough have finished, the time is up, or a stop is requested
    (SIGTERM/SIGINT: the trial in progress stops at a step and is run again by the next sweep)."""
    base_cache = BaseCache()
    start = time.monotonic()
    while finished() < trials and not (timeout and time.monotonic() - start > timeout):
        if request.requested:
            raise Stopped(f"sweep stopped by {request.reason} between trials; run the same command to continue",
                          request.exit_code)
        trial = study.ask()
        params = suggest(trial, space)
        tcfg = apply_params(cfg, params)
        tcfg.output_dir = str(sweep_dir / f"trial-{trial.number:03d}")
        if tcfg.train.eval_steps <= 0:  # pruning needs intermediate evaluations: four per run
            steps = tcfg.train.max_steps if tcfg.train.max_steps > 0 else 0
            tcfg.train.eval_steps = max(1, steps // 4) if steps else 0
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"[qfine] sweep: trial {trial.number} ({finished() + 1} of {trials}): {shown}", flush=True)
        report = _pruning_callback(trial, metric)
        try:
            train(tcfg, overwrite=True, callbacks=[report], base_cache=base_cache, stop=request)
        except Stopped as e:  # the trial stays "running": the next sweep marks it failed and asks for it again
            raise Stopped(f"sweep {e} (trial {trial.number}); run the same qfine sweep command to continue: trial "
                          f"{trial.number} is then run again from its start", e.exit_code) from None
        except QfineError as e:
            study.tell(trial, state=TrialState.FAIL)
            if not str(e).startswith("training stopped"):  # the config or data, not these parameters: stop
                raise QfineError(f"sweep trial {trial.number} ({shown}): {e}") from None
            print(f"[qfine] sweep: trial {trial.number} failed: {e}", flush=True)  # e.g. diverged at a high lr
            continue
        finally:
            base_cache.release_adapter()
        trial.set_user_attr("rss_gib", round(_rss_gib(), 3))
        if report.pruned_at is not None:
            study.tell(trial, state=TrialState.PRUNED)
            print(f"[qfine] sweep: trial {trial.number} pruned at step {report.pruned_at} ({metric} "
                  f"{report.value:.4g})", flush=True)
        elif report.value is None or not math.isfinite(report.value):
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, report.value)
            print(f"[qfine] sweep: trial {trial.number}: {metric} {report.value:.4g}", flush=True)


def _write_outputs(study, cfg: C.RunConfig, sweep_dir: Path, metric: str, direction: str) -> None:


    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if done:
        best = study.best_trial
        best_cfg = apply_params(cfg, best.params)
        best_cfg.output_dir = str(sweep_dir / "best-run")
        atomic_write_text(sweep_dir / "best.yaml", f"# qfine sweep: trial {best.number}, {metric} {best.value:.6g}\n"
                          + C.to_yaml(best_cfg))
        print(f"[qfine] sweep: best trial {best.number}: {metric} {best.value:.4g} with "
              f"{json.dumps(best.params)}; re-run it with qfine train {sweep_dir / 'best.yaml'}", flush=True)
    atomic_write_text(sweep_dir / "report.html", render(study, sweep_dir, metric, direction))
    print(f"[qfine] sweep report: {sweep_dir / 'report.html'}", flush=True)
