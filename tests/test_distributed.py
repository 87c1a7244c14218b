"""Data-parallel training launched with torchrun: two gloo processes on the CPU against one process
with the same global batch; rank 0 alone writes the run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FACT, write_jsonl
from qfine.training.callbacks import read_metrics

ROWS = [{"messages": [{"role": "user", "content": f"Question number {i}: {FACT[0]['content']}"},
                      {"role": "assistant", "content": f"Answer {i}. {FACT[1]['content']}"}]} for i in range(24)]


def _flags(tiny_dir, data, out, batch, save=3):
    return ["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "6",
            "--batch-size", str(batch), "--learning-rate", "1e-2", "--lr-scheduler", "constant", "--logging-steps", "1",
            "--save-steps", str(save), "--lora-r", "8", "--lora-alpha", "16", "--report-samples", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_env() -> dict:
    """The environment of a CPU-only child process (GPUs hidden: the gloo ranks run on the CPU, and
    so must the one-process run they are compared with)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N -m qfine ARGS`` on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "qfine", *args]
    return subprocess.run(cmd, env=_cpu_env(), capture_output=True, text=True, timeout=timeout)


def one_process(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m qfine ARGS`` in one CPU process (the reference of the data-parallel runs)."""
    return subprocess.run([sys.executable, "-m", "qfine", *args], env=_cpu_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_two_gloo_ranks_follow_the_one_process_curve_and_write_one_run(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    one = tmp_path / "one"
    ref_run = one_process(_flags(tiny_dir, data, one, 4))
    assert ref_run.returncode == 0, ref_run.stderr[-3000:]
    two = tmp_path / "two"
    done = torchrun(_flags(tiny_dir, data, two, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    ref, got = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    ref_loss = [r["loss"] for r in ref if "loss" in r]
    got_loss = [r["loss"] for r in got if "loss" in r]
    assert len(ref_loss) == len(got_loss) == 6
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 7))  # one writer: no step twice
    for a, b in zip(got_loss, ref_loss):
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-6, (got_loss, ref_loss)
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (one / "checkpoints").iterdir()) and "checkpoint-6" in names
    cfg = json.loads((two / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    assert done.stdout.count("[qfine] data:") == done.stdout.count("[qfine rank 1] data:") == 1  # both read the data
    assert done.stdout.count("[qfine] adapter: step 6") == 1  # rank 0 alone saves and says so


@pytest.mark.slow
def test_a_job_killed_on_one_rank_resumes_on_the_uninterrupted_curve(tiny_dir, tmp_path):
    """kill -9 of rank 1 after checkpoint-4 ends the whole job (torchrun stops rank 0); `--resume` under
    torchrun continues from checkpoint-4, and the run's curve equals the one-process run's."""
    import signal
    import time

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    one = tmp_path / "one"
    ref_run = one_process(_flags(tiny_dir, data, one, 4, save=2))
    assert ref_run.returncode == 0, ref_run.stderr[-3000:]
    two = tmp_path / "two"
    flags = _flags(tiny_dir, data, two, 2, save=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "qfine", *flags]
    job = subprocess.Popen(cmd, env=_cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seal = two / "checkpoints" / "checkpoint-4" / "qfine-checkpoint.json"
    deadline = time.time() + 300
    while not seal.is_file() and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert seal.is_file(), "checkpoint-4 was never sealed"
    ranks = subprocess.run(["pgrep", "-f", "-P", str(job.pid), "qfine"], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(sorted(ranks, key=int)[-1]), signal.SIGKILL)
    assert job.wait(timeout=120) != 0
    assert not (two / "adapter").exists()
    done = torchrun([*flags, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    ref = [r["loss"] for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
    got = read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 7))
    for a, b in zip([r["loss"] for r in got if "loss" in r], ref):
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-6


def _rank_pid(job_pid: int, rank: int) -> int:
    """The pid of ``rank`` among a torchrun job's worker processes (read from their environment)."""
    for pid in subprocess.run(["pgrep", "-P", str(job_pid)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no rank {rank} under {job_pid}")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_one_step_and_resumes_exactly(tiny_dir, tmp_path):
    """SIGTERM reaches rank 1 alone (a node's agent, say): both ranks stop after the same step, rank 0
    saves that step's checkpoint and says how to continue; `--resume` lands on the one-process curve."""
    import signal
    import time

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    one = tmp_path / "one"
    steps = ["--max-steps", "12"]
    ref_run = one_process([*_flags(tiny_dir, data, one, 4, save=6), *steps])
    assert ref_run.returncode == 0, ref_run.stderr[-3000:]
    two = tmp_path / "two"
    flags = [*_flags(tiny_dir, data, two, 2, save=6), *steps]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "qfine", *flags]
    job = subprocess.Popen(cmd, env=_cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = two / "metrics.jsonl"
    while (not metrics.is_file() or len(read_metrics(metrics)) < 3) and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(_rank_pid(job.pid, 1), signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode != 0
    said = [line for line in err.splitlines() if "stopped by" in line]
    assert len(said) == 1 and "a stop on another rank" in said[0], err[-3000:]  # rank 0 says it, once
    step = int(said[0].split("at step ")[1].split()[0])
    assert 3 <= step < 12
    assert (two / "checkpoints" / f"checkpoint-{step}" / "qfine-checkpoint.json").is_file()
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r] == list(range(1, step + 1))
    done = torchrun([*flags, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    ref = [r["loss"] for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
    got = [r for r in read_metrics(metrics) if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip([r["loss"] for r in got], ref):
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-6
