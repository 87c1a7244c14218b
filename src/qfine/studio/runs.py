"""What the studio shows of run directories, read from their files alone (nothing heavy imported).

A run directory is any folder under the runs root holding ``config.yaml`` (or a lock file of a
``qfine train`` still loading its model). Its metrics are read incrementally: :class:`Metrics` keeps
the parsed rows and the byte offset it read to, keyed by the file's identity, so a listing of many
runs reparses only what was appended since, and a file replaced on ``--resume`` (which drops the
rows after the resumed step) is read again from the start.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qfine.util import runstate

METRICS = "metrics.jsonl"
# the eval metric a run is shown by, the first it logged, with the direction that is better: a preference
# run's pair accuracy, a GRPO run's mean reward, a classifier's accuracy or F1, else the eval loss
BEST = (("eval_rewards/accuracies", max), ("eval_reward", max), ("eval_accuracy", max), ("eval_f1", max),
        ("eval_loss", min))


@dataclass
class _File:
    ident: tuple[int, int]  # (inode, device): a replaced file is read again from the start
    offset: int = 0
    rows: list[dict] = field(default_factory=list)
    version: int = 0  # bumped when the file was replaced: a live view starts over


class Metrics:
    """Parsed ``metrics.jsonl`` rows of many runs, read incrementally; safe across threads."""

    def __init__(self):
        self._files: dict[Path, _File] = {}
        self._lock = threading.Lock()

    def rows(self, path: Path) -> tuple[list[dict], int]:
        """``(rows, version)`` of ``path`` (no rows when it does not exist). Only whole lines are read:
        a line still being written is taken on the next call."""
        path = Path(path)
        with self._lock:
            try:
                st = path.stat()
            except OSError:
                self._files.pop(path, None)
                return [], 0
            ident = (st.st_ino, st.st_dev)
            f = self._files.get(path)
            if f is None or f.ident != ident or st.st_size < f.offset:
                version = 0 if f is None else f.version + 1
                f = self._files[path] = _File(ident, version=version)
            if st.st_size > f.offset:
                with path.open("rb") as fh:
                    fh.seek(f.offset)
                    chunk = fh.read(st.st_size - f.offset)
                whole = chunk[:chunk.rfind(b"\n") + 1]
                f.offset += len(whole)
                for line in whole.splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue  # a line that is not JSON is skipped, not fatal to the page
                    if isinstance(row, dict):
                        f.rows.append(row)
            return f.rows, f.version


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML was built with it
_configs: dict[Path, tuple[tuple[int, int], dict]] = {}


def _config(run_dir: Path) -> dict:
    """A run's config.yaml as a dict, parsed again only when the file changed."""
    path = run_dir / "config.yaml"
    try:
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        hit = _configs.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a safe loader
    except (OSError, yaml.YAMLError):
        return {}
    cfg = cfg if isinstance(cfg, dict) else {}
    _configs[path] = (key, cfg)
    return cfg


def best_metric(rows: list[dict]) -> tuple[str, float] | None:
    """The first of :data:`BEST` that the run logged, with its best value."""
    for name, better in BEST:
        values = [r[name] for r in rows if isinstance(r.get(name), (int, float))]
        if values:
            return name, better(values)
    return None


def summary(run_dir: Path, metrics: Metrics, held: set | None = None) -> dict:
    """One row of the runs page: name, state, model, objective, steps, best eval metric, duration."""
    cfg = _config(run_dir)
    model, train = cfg.get("model") or {}, cfg.get("train") or {}
    rows, _ = metrics.rows(run_dir / METRICS)
    state, detail = runstate.state_of(run_dir, held)
    steps = max((r.get("step", 0) for r in rows if isinstance(r.get("step"), int)), default=0)
    planned = train.get("max_steps", -1)
    best = best_metric(rows)
    # data.json is written once when the run first starts (config.yaml again on every --resume)
    started = _mtime(run_dir / "data.json") or _mtime(run_dir / "config.yaml") or \
        _mtime(runstate.lock_path(run_dir)) or None
    ended = time.time() if state == "running" else max(_mtime(run_dir / METRICS), _mtime(run_dir / "report.html"),
                                                       _mtime(run_dir / runstate.STATUS), started or 0)
    objective = train.get("objective", "auto")
    if objective == "auto":
        objective = "sft" if (model.get("task") or "causal-lm") == "causal-lm" else model.get("task")
    return {"name": run_dir.name, "state": state, "detail": detail,
            "model": f"{model.get('source', '?')} · {model.get('quantization', '?')}",
            "objective": objective, "steps": steps, "planned": planned if isinstance(planned, int) else -1,
            "best": {"metric": best[0], "value": best[1]} if best else None,
            "seconds": round(ended - started, 1) if started else None,
            "started": started, "loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None)}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def run_dirs(root: Path) -> list[Path]:
    """Run directories directly under ``root`` (hidden folders and the studio's own are skipped); a
    name whose lock is held but whose folder is not set up yet (a run loading its model) is included."""
    out = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return out
    names = {e.name for e in entries}
    for e in entries:
        if e.name.startswith("."):
            if e.name.endswith(".lock") and e.name[1:-5] not in names:
                out.append(root / e.name[1:-5])  # a starting run: only its lock exists
            continue
        if e.is_dir(follow_symlinks=False) and os.path.exists(os.path.join(e.path, "config.yaml")):
            out.append(Path(e.path))
    return out


def listing(root: Path, metrics: Metrics, jobs=None) -> list[dict]:
    """Every run under ``root``, newest first; ``jobs`` (:class:`~qfine.studio.jobs.Jobs`) adds the
    runs this studio started that have not set up their folder yet, and their state."""
    held = runstate.held_locks()
    rows = []
    dirs = {d.name: d for d in run_dirs(root)}
    for name in jobs.names() if jobs is not None else ():
        dirs.setdefault(name, root / name)
    for d in dirs.values():
        row = summary(d, metrics, held)
        if jobs is not None:
            row["state"], row["detail"] = jobs.state(d.name, (row["state"], row["detail"]))
        if row["state"] == "unknown" and not d.exists():
            continue  # a dead lock file of a run that never set up its folder
        rows.append(row)
    rows.sort(key=lambda r: r["started"] or time.time(), reverse=True)
    return rows


def exports(run_dir: Path) -> list[dict]:
    """The run's merges and exports under ``run_dir/exports``, with each GGUF's report when written."""
    out = []
    folder = run_dir / "exports"
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.endswith(".report.json") or p.name.endswith(".Modelfile"):
            continue
        report = None
        rp = p.with_name(p.name + ".report.json")
        if rp.is_file():
            try:
                report = _report_summary(json.loads(rp.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, AttributeError):
                report = None
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        out.append({"name": p.name, "bytes": size, "folder": p.is_dir(), "report": report})
    return out


def _report_summary(report: dict) -> dict:
    """An export report without its per-tensor list: tensor count by type and the worst tensor's error."""
    tensors = report.pop("tensors", []) or []
    types: dict[str, int] = {}
    for t in tensors:
        types[t.get("type", "?")] = types.get(t.get("type", "?"), 0) + 1
    report["tensor_types"] = types
    worst = max(tensors, key=lambda t: t.get("rel_error", 0), default=None)
    if worst is not None:
        report["worst_tensor"] = {"name": worst.get("name"), "rel_error": worst.get("rel_error")}
    return report
