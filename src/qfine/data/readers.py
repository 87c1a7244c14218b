"""Readers: files, globs, ``save_to_disk`` folders and hub datasets → ``(location, row)`` pairs.

Rows are yielded one at a time, so large JSONL/CSV/Parquet files are streamed, never held whole.
``location`` is ``"file:line"`` (JSONL, CSV), ``"file[index]"`` (JSON, Parquet, datasets) and is
used in every error message. A row that cannot be parsed is yielded as a :class:`BadRow` so the
caller decides whether to fail or skip and count it.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq
from datasets import DatasetDict, load_dataset, load_from_disk

from qfine.util.errors import QfineError


@dataclass
class BadRow:
    """A row that could not be read; ``message`` says why (the location is yielded beside it)."""

    message: str


Rows = Iterator[tuple[str, Any]]


def _iter_jsonl(path: Path, split: str) -> Rows:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRow(f"not valid UTF-8 (byte {e.start} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRow(f"malformed JSON line ({e.msg} at column {e.colno})")


def _iter_json(path: Path, split: str) -> Rows:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise QfineError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise QfineError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):  # {split: [rows]}
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if split in lists:
            data = lists[split]
        elif len(lists) == 1:
            data = next(iter(lists.values()))
        else:
            raise QfineError(f"{path}: a JSON object must map a split name ('{split}') to a list of rows; "
                             f"found keys {', '.join(data) or '(none)'}")
    if not isinstance(data, list):
        raise QfineError(f"{path}: expected a JSON list of rows or {{split: list}}")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _iter_csv(path: Path, split: str) -> Rows:
    # Python's csv refuses fields over 131,072 characters by default; a long document is a valid row
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            try:
                reader.fieldnames  # reads the header line, so line_num counts from it
            except csv.Error as e:
                raise QfineError(f"{path}:1: malformed CSV header ({e})") from None
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    yield f"{path}:{start}", BadRow(f"malformed CSV row ({e})")
                    continue
                where = f"{path}:{start}"
                cells = {k: v for k, v in row.items() if k is not None}
                bad = next((k for k, v in cells.items() if isinstance(v, str) and "\x00" in v), None)
                if bad is not None:
                    yield where, BadRow(f"column {bad!r} contains a NUL character (a binary or UTF-16 file?)")
                    continue
                yield where, cells
    except UnicodeDecodeError as e:
        raise QfineError(f"{path}: not valid UTF-8 (byte {e.start})") from None


def _iter_parquet(path: Path, split: str) -> Rows:

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise QfineError(f"{path}: not a readable Parquet file ({e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}[{i}]", row
            i += 1


def _iter_saved_dataset(path: Path, split: str) -> Rows:

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise QfineError(f"{path}: saved DatasetDict has splits {', '.join(ds)}, not '{split}'")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", row


def _iter_hub(name: str, split: str) -> Rows:

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"} or \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        raise QfineError(f"data '{name}' is not a local file and the Hugging Face Hub is switched off (offline)")
    repo, _, subset = name.partition(":")  # owner/name:config, e.g. abisee/cnn_dailymail:3.0.0
    try:
        ds = load_dataset(repo, subset or None, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - network and not-found errors come in many types
        raise QfineError(f"data '{name}' is not a local file and the hub did not provide it ({e})") from None
    for i, row in enumerate(ds):
        yield f"{name}[{i}]", row


_BY_SUFFIX: dict[str, Callable[[Path, str], Rows]] = {
    ".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet,
}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def expand(spec: str | Path) -> list[Path] | str:
    """Files named by ``spec`` (a path or a glob), or the hub dataset name it must then be."""
    spec = str(spec)
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise QfineError(f"no data files match {spec}")
        return files
    path = Path(spec).expanduser()
    if path.exists():
        return [path]
    if spec.startswith((".", "/", "~")) or Path(spec).suffix in _BY_SUFFIX or "/" not in spec:
        raise QfineError(f"data file not found: {spec}")
    return spec  # owner/name: a hub dataset


def read_rows(spec: str | Path, split: str = "train") -> Rows:
    """Yield ``(location, row)`` for every row named by ``spec``; unparsable rows come as BadRow."""
    target = expand(spec)
    if isinstance(target, str):
        yield from _iter_hub(target, split)
        return
    for path in target:
        if _is_saved_dataset(path):
            yield from _iter_saved_dataset(path, split)
        elif path.is_dir():
            raise QfineError(f"{path} is a folder but not a dataset saved with save_to_disk")
        elif path.suffix in _BY_SUFFIX:
            yield from _BY_SUFFIX[path.suffix](path, split)
        else:
            raise QfineError(f"{path}: unsupported data file type '{path.suffix}' "
                             f"(use {', '.join(_BY_SUFFIX)} or a save_to_disk folder)")
