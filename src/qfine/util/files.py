"""Atomic output helpers: write to a temporary sibling, then rename into place.

An interrupted save therefore leaves either the previous good output or nothing, never half a file.
The temporary files are created private (0600/0700, so nobody reads a half-written one); before the
rename they get the mode a plain ``open``/``mkdir`` would have given (0666/0777 less the umask), so
outputs are as readable as ``save_pretrained``'s, e.g. by a serving user on a shared machine.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qfine.util.errors import QfineError


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _plain_mode(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def plain_modes(folder: str | os.PathLike) -> None:
    """Give every file and folder under ``folder`` the mode a plain ``open``/``mkdir`` would have.

    Libraries that write through a private temporary file and rename it (safetensors does) leave
    their outputs 0600, unreadable by a serving user; executables keep their execute bits.
    """
    mask = _umask()
    for path in Path(folder).rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        else:
            exe = 0o111 if path.stat().st_mode & 0o100 else 0
            os.chmod(path, (0o666 | exe) & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``target``; on success rename it to ``target``.

    ``replace=True`` swaps out an existing ``target`` (the old one is removed only after the new
    one is complete); otherwise an existing ``target`` is an error raised before any work is done.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        plain_modes(tmp)
        _plain_mode(tmp, directory=True)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _plain_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---- failed writes: full disks, quotas, read-only and forbidden folders ----------------------------

_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EFBIG: "the file is larger than allowed"}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_FULL = 1 << 20  # less free than this after a failed write: the disk filled up, whatever the writer said


def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing ancestor (what ``shutil.disk_usage`` can measure)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to an unprivileged writer on the file system that holds (or would hold) ``path``."""
    st = os.statvfs(existing_parent(path))
    return st.f_bavail * st.f_frsize


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's own, or the one a library quoted in its message
    (safetensors: "(os error 28)"; torch names the strerror text)."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return exc.errno
    text = str(exc)
    if (m := _OS_ERROR.search(text)) and int(m.group(1)) in _WRITE_ERRNOS:
        return int(m.group(1))
    for code in _WRITE_ERRNOS:
        if os.strerror(code) in text:
            return code
    if isinstance(exc, OSError) and exc.errno is None and _SHORT_WRITE.search(text):
        return errno.ENOSPC  # numpy's tofile: the device took fewer bytes than it was given
    return None


def write_failure(exc: BaseException, path: str | os.PathLike, what: str, needed: int | None = None,
                  kept: str = "") -> QfineError | None:
    """A one-line user error for ``exc`` raised while ``what`` wrote to ``path``, or None when it is
    not a storage failure. A writer's own message may say nothing of the cause (torch's zip writer on
    a full disk: "unexpected pos"); then an almost full file system is taken to be it."""
    if isinstance(exc, QfineError):
        return None
    code = _errno_of(exc)
    free = free_bytes(path)
    if code is None and isinstance(exc, (OSError, RuntimeError, ValueError)) and free < max(_FULL, needed or 0):
        code = errno.ENOSPC
    if code is None:
        return None
    line = f"{what}: cannot write {path}: {_WRITE_ERRNOS[code]}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        line += f" ({human_bytes(free)} free there" + (f", about {human_bytes(needed)} needed)" if needed else ")")
    return QfineError(line + (f"; {kept}" if kept else ""))


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str, needed: int | None = None, kept: str = "") -> Iterator[None]:
    """Turn a storage failure inside the block into :func:`write_failure`'s error (anything else passes)."""
    try:
        yield
    except Exception as e:
        failure = write_failure(e, path, what, needed, kept)
        if failure is None:
            raise
        raise failure from None


@contextlib.contextmanager
def thread_write_failures(where: str | os.PathLike) -> Iterator[None]:
    """Inside the block, a background thread (TensorBoard's event writer) that dies on a storage
    failure under ``where`` says so in one line instead of a traceback; the main thread meets the
    same disk at its next write and stops with :func:`write_failure`'s error."""
    import sys
    import threading

    previous = threading.excepthook

    def hook(args):
        failure = write_failure(args.exc_value, where, f"background writer {args.thread.name}") \
            if isinstance(args.exc_value, Exception) else None
        if failure is None:
            previous(args)
        else:
            print(f"[qfine] {failure}", file=sys.stderr, flush=True)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
