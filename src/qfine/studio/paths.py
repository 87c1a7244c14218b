"""Every path the studio reads or writes for a browser, confined to the roots it was started with.

The browser names a run by its folder name and a data file by a path relative to a data root. Both
are checked before anything touches the disk: no absolute path, no ``..`` component, no hidden name,
and the real path (symlinks resolved) must still lie inside the root. Percent-encoded forms arrive
here already decoded by the router, so ``%2e%2e%2f`` is refused as the ``../`` it is.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from qfine.util.errors import QfineError

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Refused(QfineError):
    """A path or name from the browser that would leave the roots (answered 403)."""


def run_name(name: str) -> str:
    """A run's folder name as the browser sent it, checked: letters, digits, ``._-``, no leading dot."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
        raise Refused(f"{name!r} is not a run name (letters, digits, '.', '_', '-'; at most 100)")
    return name


def inside(root: Path, relative: str, must_exist: bool = True) -> Path:
    """``root / relative`` with every symlink resolved, refused unless it stays inside ``root``.

    ``relative`` uses ``/`` separators; absolute paths, ``..`` and hidden components are refused
    before the disk is looked at, and the resolved path is checked again (a symlink pointing out)."""
    if not isinstance(relative, str) or not relative or "\x00" in relative or "\\" in relative:
        raise Refused(f"{relative!r} is not a relative path")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or any(part in ("..", "") or part.startswith(".") for part in pure.parts):
        raise Refused(f"{relative!r} leaves the allowed folders (absolute, '..' or hidden)")
    real_root = root.resolve()
    target = (real_root / pure).resolve(strict=False)
    if not target.is_relative_to(real_root):
        raise Refused(f"{relative!r} resolves outside {root} (a symlink out)")
    if must_exist and not target.exists():
        raise QfineError(f"{relative} does not exist under {root}")
    return target


def in_roots(roots: list[Path], relative: str, must_exist: bool = True) -> Path:
    """The first data root that holds ``relative`` (or, when it need not exist, the first root)."""
    last: QfineError | None = None
    for root in roots:
        try:
            return inside(root, relative, must_exist)
        except Refused:
            raise
        except QfineError as e:
            last = e
    raise last or QfineError("no data root was given (qfine studio --data DIR)")


def listed(roots: list[Path], suffixes=(".jsonl", ".json", ".csv", ".parquet", ".txt"), limit: int = 500) -> list[str]:
    """Data files under the roots, as the relative paths :func:`in_roots` takes (symlinks out skipped)."""
    out: list[str] = []
    for root in roots:
        real_root = root.resolve()
        for p in sorted(real_root.rglob("*")):
            rel = p.relative_to(real_root)
            if any(part.startswith(".") for part in rel.parts) or p.suffix not in suffixes or not p.is_file():
                continue
            if not p.resolve().is_relative_to(real_root):
                continue
            out.append(rel.as_posix())
            if len(out) >= limit:
                return out
    return out
