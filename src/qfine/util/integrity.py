"""Damaged inputs named before a library trips over them: a truncated safetensors file, a GGUF that
ends early, a config.json that is not JSON, a checkpoint whose optimizer state is corrupt.

The libraries that read these files fail far from the cause ("cannot reshape array of size 66784",
"unexpected pos", a JSON decoder's column) or, for a truncated safetensors shard, at the first
tensor that falls beyond the end. Each check here reads headers and sizes only (a zip's CRCs for
torch's small pickled states), so it costs milliseconds, and raises one :class:`QfineError` naming
the file and what is wrong with it.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from qfine.util.errors import QfineError

_TORCH_STATES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "training_args.bin")


def _damaged(path: Path, what: str) -> QfineError:
    return QfineError(f"{path} is damaged: {what}")


def check_json(path: str | Path) -> None:
    path = Path(path)
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _damaged(path, "it is not UTF-8 text, so not JSON") from None
    except json.JSONDecodeError as e:
        raise _damaged(path, f"not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None


def check_safetensors(path: str | Path) -> None:
    """The header parses and the file is exactly as long as the header's tensors say."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"{size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _damaged(path, f"its header claims {n} bytes but the file has {size}: it ends early or is not "
                                 "a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _damaged(path, "its header is not readable JSON (not a safetensors file?)") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise _damaged(path, f"it ends early: {size} bytes, its header describes {expected} (truncated by an "
                             "interrupted copy or download?)")


def check_gguf(path: str | Path) -> None:
    """The magic, the metadata and every tensor's extent lie inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise _damaged(path, "it does not start with the GGUF magic (not a GGUF file)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader's own errors say nothing of the cause: a file that ends early
        raise _damaged(path, f"its metadata or tensors cannot be read ({size} bytes; ends early?): "
                             f"{type(e).__name__}: {e}") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise _damaged(path, f"it ends early: {size} bytes, its tensors extend to {end}")


def check_torch_file(path: str | Path) -> None:
    """torch.save's zip archive is whole and every entry's CRC matches."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as e:
        raise _damaged(path, f"not a whole torch.save archive ({e}; truncated?)") from None
    except (OSError, EOFError, ValueError) as e:  # a damaged entry header
        raise _damaged(path, f"not a whole torch.save archive ({e})") from None
    if bad is not None:
        raise _damaged(path, f"the checksum of its entry {bad} does not match (bytes were changed)")


def check_folder(folder: str | Path, recursive: bool = False) -> None:
    """Every JSON and safetensors file of a model or adapter folder (``recursive``: its subfolders too)."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    for path in sorted(p for p in found if p.is_file() and not p.name.startswith(".")):
        if path.suffix == ".json":
            check_json(path)
        elif path.suffix == ".safetensors":
            check_safetensors(path)


def check_checkpoint(folder: str | Path) -> None:
    """A checkpoint's adapter, states and JSON records, with the way out when one is damaged."""
    folder = Path(folder)
    try:
        check_folder(folder, recursive=True)
        for name in _TORCH_STATES:
            if (folder / name).is_file():
                check_torch_file(folder / name)
    except QfineError as e:
        raise QfineError(f"--resume: {e}. Remove {folder} to resume from the checkpoint before it, or start "
                         "over") from None
