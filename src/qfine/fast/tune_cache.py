"""The decode kernels' tuned settings kept on disk, so that a new process (the next ``qfine generate``, ``chat``
or GRPO run) reuses the timings an earlier one made instead of timing every candidate again.

One JSON file per fingerprint under ``$QFINE_TUNE_CACHE``, else ``$QFINE_CACHE/tuned/`` (default
``~/.cache/qfine/tuned/``); ``QFINE_TUNE_CACHE=off`` neither reads nor stores (the tests: timings taken
beside other test processes must not become a user's choice). The fingerprint
covers what a timing depends on: the device's name, compute capability and SM count; torch, CUDA, Triton and
qfine versions; the source of every module of :mod:`qfine.fast`; and the environment switches that
change which settings exist or how they launch (``QFINE_PDL``, ``QFINE_MMA_FETCH``, ``QFINE_TRITON_NF4``,
``QFINE_ATTN_DOT``, ``QFINE_MMA_ROWS``).
Any change gives another file, so a stale choice is never read. ``QFINE_RETUNE=1`` ignores what is stored
and replaces it with new timings. A file that cannot be read or written only costs the timing.

Needs no Triton or CUDA itself: the tuners call it with their shape key and device.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import json
import os
from pathlib import Path

import torch

KEEP = 8  # fastest settings stored per key: the first is used, the rest are what a reader compares it with
SWITCHES = ("QFINE_PDL", "QFINE_MMA_FETCH", "QFINE_TRITON_NF4", "QFINE_ATTN_DOT", "QFINE_MMA_ROWS")
_LOADED: dict[Path, dict] = {}  # file -> its entries as read once by this process


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def fingerprint(device: torch.device) -> str:
    """32 hex digits naming what a timing on ``device`` depends on (see the module's docstring)."""
    from qfine import __version__

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = [props.name, f"{props.major}.{props.minor}", str(props.multi_processor_count), str(torch.version.cuda)]
    else:
        where = [device.type]
    parts = [*where, torch.__version__, _version("triton"), __version__]
    parts += [f"{name}={os.environ.get(name, '')}" for name in SWITCHES]
    # every module of the package, not a list kept by hand: a new kernel file cannot be left out
    for path in sorted(importlib.resources.files("qfine.fast").iterdir(), key=lambda p: p.name):
        if path.name.endswith((".py", ".cu")):
            parts.append(f"{path.name}={hashlib.sha256(path.read_bytes()).hexdigest()}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _plain(value):
    """A shape key's part as JSON: devices dropped (the fingerprint names the device), dtypes by name,
    shapes and tuples as lists."""
    if isinstance(value, (tuple, list, torch.Size)):
        return [_plain(v) for v in value if not isinstance(v, torch.device)]
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def key_text(key: tuple) -> str:
    """The text a shape key is stored under."""
    return json.dumps(_plain(key), separators=(",", ":"))


def _path(device: torch.device) -> Path | None:
    """The file for ``device``'s fingerprint, or None where the cache is off (``QFINE_TUNE_CACHE=off``)."""
    folder = os.environ.get("QFINE_TUNE_CACHE", "")
    if folder == "off":
        return None
    if not folder:
        folder = Path(os.environ.get("QFINE_CACHE", Path.home() / ".cache" / "qfine")) / "tuned"
    return Path(folder) / f"{fingerprint(device)}.json"


def _valid(timed) -> bool:
    """Whether a stored value is [[seconds, setting], ...], fastest first."""
    return isinstance(timed, list) and bool(timed) and all(
        isinstance(t, list) and len(t) == 2 and isinstance(t[0], (int, float)) and isinstance(t[1], dict)
        for t in timed)


def _read(path: Path) -> dict:
    """The file's well-formed entries ({} for a missing, cut or foreign file)."""
    try:
        entries = json.loads(path.read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: v for k, v in entries.items() if _valid(v)} if isinstance(entries, dict) else {}


def remembered(key: tuple, device: torch.device) -> list | None:
    """[(seconds, setting)] fastest first as stored for this key and device's fingerprint, or None (nothing
    stored, an unreadable file, the cache off, or ``QFINE_RETUNE=1``)."""
    path = _path(device)
    if os.environ.get("QFINE_RETUNE") == "1" or path is None:
        return None
    if path not in _LOADED:
        _LOADED[path] = _read(path)
    got = _LOADED[path].get(key_text(key))
    return None if got is None else [(float(seconds), setting) for seconds, setting in got]


def remember(key: tuple, device: torch.device, timed: list) -> None:
    """Store the fastest :data:`KEEP` of ``timed`` ([(seconds, setting)], fastest first; settings of JSON
    values) for this key, merged with what other processes stored meanwhile, written whole or not at all."""
    path = _path(device)
    if path is None:
        return
    entries = _read(path)
    entries[key_text(key)] = [[seconds, setting] for seconds, setting in timed[:KEEP]]
    _LOADED[path] = entries
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"entries": entries}, indent=0))
        os.replace(tmp, path)  # another process may be reading it
    except (OSError, TypeError, ValueError):
        pass  # a read-only home only costs the next process the timing


def known(table: dict, key: tuple, device: torch.device) -> list | None:
    """A tuner's timings of ``key``: this process's (``table``), else an earlier process's (read once into
    ``table``), else None."""
    got = table.get(key)
    if got is None:
        got = remembered(key, device)
        if got is not None:
            table[key] = got
    return got


def measured(table: dict, key: tuple, device: torch.device, timed: list) -> list:
    """Keep new timings ``timed`` (fastest first) of ``key`` in ``table`` for this process and on disk for
    the next; returns them."""
    table[key] = timed
    remember(key, device, timed)
    return timed
