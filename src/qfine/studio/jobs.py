"""The studio's processes: ``qfine train``, ``qfine merge`` and ``qfine export``, each its own process.

A job is started with an argument list (never a shell) in a new session, so it outlives the browser
and the studio itself: a restarted studio finds a training run again through its lock and
``status.json`` (:mod:`qfine.util.runstate`). Its output goes to ``RUNS/.studio/logs/``. Stop sends
SIGTERM to the process holding the run's lock, which qfine train answers by saving a checkpoint at
the end of the current step and exiting 143; Resume starts ``qfine train RUN/config.yaml --resume``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qfine import config as C
from qfine.util import runstate
from qfine.util.errors import QfineError
from qfine.util.files import atomic_write_text

GGUF_QUANTS = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q4_1")


@dataclass
class Job:
    """One process the studio started: what it runs, where its output goes, how it ended."""

    run: str
    kind: str  # train, resume, merge, export
    argv: list[str]
    log: Path
    process: subprocess.Popen
    started: float
    out: str = ""  # what it writes (export/merge), relative to the run directory

    def view(self) -> dict:
        code = self.process.poll()
        return {"run": self.run, "kind": self.kind, "out": self.out, "started": self.started,
                "state": "running" if code is None else ("done" if code == 0 else f"exit {code}"),
                "exit_code": code, "log": tail(self.log)}


def tail(path: Path, limit: int = 6000) -> str:
    """The last ``limit`` bytes of a log, as text."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Jobs:
    """Starts and tracks the studio's processes under ``runs_root``."""

    def __init__(self, runs_root: Path):
        self.root = runs_root
        self.logs = runs_root / ".studio" / "logs"
        self.configs = runs_root / ".studio" / "configs"
        self._jobs: list[Job] = []
        self._lock = threading.Lock()

    def _start(self, run: str, kind: str, args: list[str], out: str = "") -> Job:
        self.logs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log = self.logs / f"{run}.{kind}{'-' + out.replace('/', '_') if out else ''}.{stamp}.log"
        argv = [sys.executable, "-m", "qfine", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log.open("wb") as fh:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                       cwd=self.root, env=env, start_new_session=True)
        job = Job(run, kind, argv, log, process, time.time(), out)
        with self._lock:
            self._jobs.append(job)
        return job

    def jobs(self, run: str | None = None) -> list[dict]:
        with self._lock:
            return [j.view() for j in self._jobs if run is None or j.run == run]

    def latest(self, run: str) -> Job | None:
        """The newest train/resume job of ``run`` this studio started, if any."""
        with self._lock:
            return next((j for j in reversed(self._jobs) if j.run == run and j.kind in ("train", "resume")), None)

    def state(self, run: str, state: tuple[str, str]) -> tuple[str, str]:
        """``state`` (from the run directory) completed by what this studio saw of its own process: a
        run whose folder is not set up yet is ``starting`` while its process lives, and ``failed``
        (with the last line it printed) when it exited with an error before writing anything."""
        if state[0] != "unknown":
            return state
        job = self.latest(run)
        if job is None:
            return state
        code = job.process.poll()
        if code is None:
            return "starting", f"pid {job.process.pid}: loading"
        if code != 0:
            lines = [line for line in tail(job.log).splitlines() if line.strip()]
            return "failed", lines[-1] if lines else f"exit {code}"
        return state

    def names(self) -> set[str]:
        with self._lock:
            return {j.run for j in self._jobs if j.kind in ("train", "resume")}

    def running_train(self, run: str) -> Job | None:
        with self._lock:
            return next((j for j in reversed(self._jobs) if j.run == run and j.kind in ("train", "resume")
                         and j.process.poll() is None), None)

    def launch(self, run: str, cfg: C.RunConfig) -> Job:
        """Write ``cfg`` (its output_dir set to ``RUNS/run``) and start ``qfine train`` on it."""
        run_dir = self.root / run
        if run_dir.exists() or runstate.lock_holder(run_dir) is not None:
            raise QfineError(f"a run named {run} exists already: pick another name, or resume it")
        cfg.output_dir = str(run_dir.resolve())
        self.configs.mkdir(parents=True, exist_ok=True)
        path = self.configs / f"{run}.yaml"
        atomic_write_text(path, C.to_yaml(cfg))
        return self._start(run, "train", ["train", str(path)])

    def resume(self, run: str) -> Job:
        run_dir = self.root / run
        state, _ = runstate.state_of(run_dir)
        previous = self.running_train(run)
        if previous is not None and state != "running":
            try:  # its end is recorded and its lock released: the process is only exiting
                previous.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if state == "running" or self.running_train(run):
            raise QfineError(f"{run} is running already")
        if state == "finished":
            raise QfineError(f"{run} has finished: nothing to resume")
        if not (run_dir / "checkpoints").is_dir():
            raise QfineError(f"{run} has no checkpoint to resume from")
        return self._start(run, "resume", ["train", str(run_dir / "config.yaml"), "--resume"])

    def stop(self, run: str) -> int:
        """SIGTERM to the process that holds ``run``'s lock; returns its pid."""
        holder = runstate.lock_holder(self.root / run)
        if holder is None:
            raise QfineError(f"{run} is not running")
        pid, host = holder.get("pid"), holder.get("host")
        if host != socket.gethostname() or not isinstance(pid, int):
            raise QfineError(f"{run} runs on {host}, not here: stop it there")
        if not _is_qfine(pid):
            raise QfineError(f"pid {pid} holding {run}'s lock is not a qfine process; not signalled")
        os.kill(pid, signal.SIGTERM)
        return pid

    def export(self, run: str, form: str, quant: str = "") -> Job:
        """``qfine export`` (gguf at ``quant``) or ``qfine merge`` (form ``merged``) into RUN/exports."""
        run_dir = self.root / run
        if not (run_dir / "adapter").is_dir():
            raise QfineError(f"{run} has no adapter yet: it exports once training has finished")
        if form == "gguf":
            if quant not in GGUF_QUANTS:
                raise QfineError(f"unknown GGUF type {quant!r}: one of {', '.join(GGUF_QUANTS)}")
            out = f"exports/{run}-{quant}.gguf"
            args = ["export", str(run_dir), "--format", "gguf", "--quant", quant, "--out", str(run_dir / out)]
        elif form == "merged":
            out = "exports/merged-bf16"
            args = ["merge", str(run_dir), "--out", str(run_dir / out), "--dtype", "bf16"]
        else:
            raise QfineError(f"unknown export {form!r}: gguf or merged")
        if (run_dir / out).exists():
            raise QfineError(f"{out} exists already in {run}")
        (run_dir / "exports").mkdir(exist_ok=True)
        return self._start(run, "export" if form == "gguf" else "merge", args, out)


def _is_qfine(pid: int) -> bool:
    """Whether ``pid`` runs qfine (its command line names it): a lock's pid is never signalled blindly."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"qfine" in part for part in cmdline)
