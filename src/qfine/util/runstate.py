"""A run's state as another process sees it: running, finished, stopped, failed or killed.

Two facts decide it, neither of them a guess from timestamps:

- ``qfine train`` holds an ``flock`` on ``.NAME.lock`` beside the run directory for as long as it runs
  (:mod:`qfine.util.lock`); the kernel drops it when the process dies, ``kill -9`` included. Whether it
  is held is read from ``/proc/locks`` (no lock is taken, so a starting run is never refused because
  someone looked); a lock file not listed there is checked by trying a shared lock without waiting.
- The run writes ``status.json`` in its directory: ``running`` (with its pid) once the directory is set
  up, then ``finished``, ``stopped`` or ``failed`` (with the message the command printed) as it ends.

A ``running`` record whose lock nobody holds is a run that was killed. A run directory made before
``status.json`` existed is ``finished`` when it has an adapter, else ``unknown``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from qfine.util.files import atomic_write_text
from qfine.util.lock import lock_path

__all__ = ["STATUS", "ENDED", "lock_path", "write_status", "read_status", "lock_holder", "state_of", "held_locks"]

STATUS = "status.json"
ENDED = ("finished", "stopped", "failed")


def write_status(run_dir: str | os.PathLike, state: str, message: str = "") -> None:
    """Record ``state`` (``running`` or one of :data:`ENDED`) in ``run_dir/status.json``, atomically.
    Nothing is written where the run directory was never set up (a run that failed while loading)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return
    record = {"state": state, "pid": os.getpid(), "time": time.time()}
    if message:
        record["message"] = message
    with contextlib.suppress(OSError):  # a full disk must not hide the error that ended the run
        atomic_write_text(run_dir / STATUS, json.dumps(record) + "\n")


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """The record in ``run_dir/status.json``, or None where there is none (or it is unreadable)."""
    try:
        record = json.loads((Path(run_dir) / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def held_locks() -> set[tuple[int, int]] | None:
    """(device, inode) of every file some process holds an flock on, from /proc/locks; None off Linux.
    One read serves many :func:`lock_holder` / :func:`state_of` calls."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    held = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:02:131 0 EOF" (a waiting lock has "->" after the number)
        if "FLOCK" not in parts:
            continue
        where = parts[parts.index("FLOCK") + 4]
        major, minor, inode = where.split(":")
        held.add((os.makedev(int(major, 16), int(minor, 16)), int(inode)))
    return held


def _probe_held(path: Path) -> bool:
    """Whether some process holds the flock on ``path``, by asking for a shared lock without waiting
    (and dropping it at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def lock_holder(target: str | os.PathLike, held: set | None = None) -> dict | None:
    """What the process writing ``target`` wrote into its lock file (pid, host, command, since), while
    it holds the lock; None when no process holds it. ``held``: :func:`held_locks`' answer, to share
    one read of /proc/locks between many targets."""
    path = lock_path(target)
    try:
        st = path.stat()
    except OSError:
        return None
    held = held_locks() if held is None else held
    if held is None or (st.st_dev, st.st_ino) not in held:
        # not listed (or no /proc/locks): a lock file outlives only a killed holder, so this is nearly
        # always a dead lock; a file system whose /proc/locks numbers differ from stat's is caught here too
        if not _probe_held(path):
            return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    return info if isinstance(info, dict) else {}


def state_of(run_dir: str | os.PathLike, held: set | None = None) -> tuple[str, str]:
    """``(state, detail)`` of a run directory: state is running, finished, stopped, failed, killed or
    unknown; detail is the message of a stop or failure, or the pid of a running one."""
    run_dir = Path(run_dir)
    holder = lock_holder(run_dir, held)
    if holder is not None:
        return "running", f"pid {holder.get('pid', '?')}"
    record = read_status(run_dir)
    if record is not None:
        state = record.get("state")
        if state in ENDED:
            return state, str(record.get("message", ""))
        if state == "running":
            return "killed", f"pid {record.get('pid', '?')} ended without a word (no lock held, no end recorded)"
    if (run_dir / "adapter").is_dir():
        return "finished", ""
    return "unknown", "no status.json (a run made by an older qfine, or not a run)"
