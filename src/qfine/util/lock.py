"""One writer per output: an advisory lock beside the directory (or file) a command writes.

The lock is ``flock`` on ``.NAME.lock`` in the output's parent folder (beside it, not in it: a run
directory is emptied by ``--overwrite`` and a merge's output only appears when it is whole). The
kernel releases an flock when its holder dies, ``kill -9`` included, so a lock is never stale: a
lock file left by a killed process is taken over by the next command. The holder writes its pid,
host and command into the file so that a refused command can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from qfine.util.errors import QfineError
from qfine.util.files import writing


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} ({info['command']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold(target: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the write lock of ``target`` inside the block; raise :class:`QfineError` naming the
    holder when another process has it. ``command`` (``"qfine train"``) is what the holder is doing."""
    path = lock_path(target)
    while True:
        with writing(path, command):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QfineError(f"{Path(target)} is in use by {_holder(path)}; wait for it to end or write elsewhere "
                             f"(the lock is {path}, released by the system when its holder exits)") from None
        # the previous holder may have removed the file between our open and our lock: then the lock
        # is on a file nobody else will open, and the current one must be locked instead
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a process waiting on the old file retries on a new one
        os.close(fd)
