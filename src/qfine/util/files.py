"""Atomic output helpers: write to a temporary sibling, then rename into place.

An interrupted save therefore leaves either the previous good output or nothing, never half a file.
The temporary files are created private (0600/0700, so nobody reads a half-written one); before the
rename they get the mode a plain ``open``/``mkdir`` would have given (0666/0777 less the umask), so
outputs are as readable as ``save_pretrained``'s, e.g. by a serving user on a shared machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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
