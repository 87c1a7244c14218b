"""Safe on preemptible and shared machines: SIGTERM/SIGINT end a run at a step with a sealed
checkpoint and an exact continuation; one writer per output; a stopped merge leaves nothing.

The `qfine` processes here are real ones on the tiny 4-bit Llama (CPU): signals are sent to them
while they train, at steps drawn at random (the seed is printed, so a failure can be replayed).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import sums
from qfine.training import train
from qfine.training.resume import SEAL, why_incomplete
from qfine.training.stop import StopRequest, signals_stop

STEPS, SAVE = 24, 6


def _curve(run_dir) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _args(tiny_dir, data, out, steps=STEPS) -> list[str]:
    return [sys.executable, "-m", "qfine", "train", "--model", str(tiny_dir), "--data", str(data),
            "--output-dir", str(out), "--max-steps", str(steps), "--save-steps", str(SAVE), "--batch-size", "4",
            "--learning-rate", "5e-3", "--lr-scheduler", "cosine", "--lora-r", "8", "--lora-alpha", "16",
            "--report-samples", "0"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _signal_at(proc: subprocess.Popen, run_dir: Path, step: int, signum: int, timeout: float = 300) -> None:
    """Send ``signum`` to ``proc`` once the run has logged ``step``."""
    deadline = time.time() + timeout
    while _logged_step(run_dir) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the signal"
    os.kill(proc.pid, signum)


@pytest.fixture(scope="module")
def full_curve(tiny_dir, tmp_path_factory):
    """The data and the loss curve of the uninterrupted run (one process, same flags)."""
    tmp = tmp_path_factory.mktemp("full")
    data = sums(tmp / "sums.jsonl")
    done = subprocess.run(_args(tiny_dir, data, tmp / "full"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, _curve(tmp / "full")


def _stop(args, run_dir, step, signum) -> tuple[int, str]:
    """Run ``args``, send ``signum`` once ``step`` is logged; returns (exit status, stderr)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _signal_at(proc, run_dir, step, signum)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow  # four qfine processes: about a minute on 2 cores
def test_sigterm_then_sigint_at_random_steps_save_and_resume_on_the_uninterrupted_curve(tiny_dir, tmp_path,
                                                                                       full_curve):
    data, full = full_curve
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    first, second = rng.randint(2, 9), rng.randint(13, 20)
    print(f"\n[stops] seed {seed}: SIGTERM once step {first} is logged, SIGINT once step {second} is")
    run = tmp_path / "run"
    code, err = _stop(_args(tiny_dir, data, run), run, first, signal.SIGTERM)
    assert code == 143, err[-3000:]
    stopped_at = int(err.split("at step ")[1].split()[0])
    assert first <= stopped_at < STEPS
    ckpt = run / "checkpoints" / f"checkpoint-{stopped_at}"
    assert (ckpt / SEAL).is_file() and why_incomplete(ckpt) is None
    assert f"continue with: qfine train {run / 'config.yaml'} --resume" in err
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in (run / "report.html").read_text()
    assert not (run / "adapter").exists()  # a stopped run has no final adapter
    assert [s for s, _ in _curve(run)] == list(range(1, stopped_at + 1))

    resume = [sys.executable, "-m", "qfine", "train", str(run / "config.yaml"), "--resume"]
    code, err = _stop(resume, run, second, signal.SIGINT)
    assert code == 130, err[-3000:]
    again = int(err.split("at step ")[1].split()[0])
    assert second <= again < STEPS and why_incomplete(run / "checkpoints" / f"checkpoint-{again}") is None

    done = subprocess.run(resume, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _curve(run)
    assert [s for s, _ in resumed] == list(range(1, STEPS + 1))
    worst = max(abs(x - y) / abs(y) for (_, x), (_, y) in zip(resumed, full))
    print(f"[stops] worst per-step loss rel. diff against the uninterrupted run: {worst:.2e}")
    assert worst <= 1e-6
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_second_signal_is_not_caught():
    """The first signal raises the request and gives the signal back to the previous handler; that
    handler takes the second one (the CLI's ends the command at once)."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        request = StopRequest()
        with signals_stop(request):
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.requested and request.signum == signal.SIGTERM and not seen
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [signal.SIGTERM]
        assert request.exit_code == 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stop_requested_by_the_caller_ends_the_run_at_a_step(tiny_dir, tmp_path):
    """The Python API's stop (what a UI's Stop button raises): stopped at the step, the checkpoint sealed."""
    from transformers import TrainerCallback

    from helpers import tiny_config
    from qfine.training.stop import Stopped

    request = StopRequest()

    class PressStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                request.request("the Stop button")

    data = sums(tmp_path / "d.jsonl", 16)
    cfg = tiny_config(tiny_dir, data, tmp_path / "run", max_steps=20, report_samples=0)
    with pytest.raises(Stopped, match="stopped by the Stop button at step 3 of 20") as e:
        train(cfg, callbacks=[PressStop()], stop=request)
    assert e.value.exit_code == 143
    assert why_incomplete(tmp_path / "run" / "checkpoints" / "checkpoint-3") is None


def _hold_in_child(target: Path):
    code = ("import sys, time\nfrom qfine.util.lock import hold\n"
            f"with hold({str(target)!r}, 'qfine train'):\n    print('held', flush=True)\n    time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert child.stdout.readline().strip() == "held"
    return child


def test_one_writer_per_output_and_no_stale_lock_after_kill_9(tiny_dir, tmp_path):
    data = sums(tmp_path / "d.jsonl", 16)
    run = tmp_path / "run"
    child = _hold_in_child(run)
    try:
        for args in (_args(tiny_dir, data, run), [sys.executable, "-m", "qfine", "merge", str(run), "--out", str(run)]):
            refused = subprocess.run(args, env=_env(), capture_output=True, text=True)
            assert refused.returncode == 2, refused.stderr[-2000:]
            assert f"{run} is in use by pid {child.pid} on {os.uname().nodename} (qfine train" in refused.stderr
            assert "Traceback" not in refused.stderr
        assert not run.exists()  # the refused run wrote nothing
    finally:
        child.kill()
        child.wait()
    done = subprocess.run(_args(tiny_dir, data, run, steps=2), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]  # the kernel released the killed holder's lock
    assert not (tmp_path / ".run.lock").exists()  # and the run removed its own when it ended


def test_a_merge_stopped_by_sigterm_leaves_no_output(tiny_dir, tmp_path):
    from helpers import tiny_config

    data = sums(tmp_path / "d.jsonl", 16)
    run = train(tiny_config(tiny_dir, data, tmp_path / "run", max_steps=2, report_samples=0))
    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-m", "qfine", "merge", str(run), "--out", str(out), "--dtype", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while not any(p.name.startswith(".merged.tmp-") for p in tmp_path.iterdir()) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the merge ended before it could be stopped: {proc.stderr.read()[-2000:]}")
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "merge interrupted by SIGTERM; no partial output was left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "run"]
