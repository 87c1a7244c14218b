"""What the studio's API answers beyond listings: a config from the launch form, the memory plan's
verdict, a data file's preview with its scored tokens marked, and one run's details."""

from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path

from qfine import config as C
from qfine.studio import paths
from qfine.studio.runs import Metrics, exports, summary
from qfine.util.errors import QfineError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_cache_lock = threading.Lock()
_tokenizers: dict[str, object] = {}


def model_source(value: str, data_roots: list[Path]) -> str:
    """A model source from the form: ``default``, a hub id (read from the local cache only, as
    everywhere in qfine), or a folder/GGUF inside a data root; nothing else on the disk."""
    if value == "default" or (HUB_ID.fullmatch(value) and not value.startswith((".", "/"))
                              and not any(r.joinpath(value).exists() for r in data_roots)):
        return value
    return str(paths.in_roots(data_roots, value))


def build_config(fields: dict, data_roots: list[Path], need_data: bool = True) -> C.RunConfig:
    """A RunConfig from ``{"section.field": value}``; each bad field is one QfineError naming it.
    The data paths and a model folder are checked against the data roots and made absolute.
    ``need_data``: off for the memory plan, which needs only the model and the shapes."""
    if not isinstance(fields, dict):
        raise QfineError("fields: a mapping of section.field to value")
    overrides = {}
    for key, value in fields.items():
        section, _, name = key.rpartition(".")
        if section not in C.SECTIONS or name not in {f.name for f in C.flags() if f.section == section}:
            raise QfineError(f"unknown config field {key!r}{C.did_you_mean(key, _field_names())}")
        if value in ("", None):
            continue
        if key in ("data.path", "data.eval_path"):
            value = str(paths.in_roots(data_roots, value))
        elif key == "model.source":
            value = model_source(str(value), data_roots)
        elif key == "train.init_adapter":
            raise QfineError("train.init_adapter is not set from the studio: start from the run's own config")
        overrides[(section, name)] = value
    cfg = C.apply_overrides(C.RunConfig(), overrides)
    if need_data and not cfg.data.path:
        raise QfineError("data.path: choose a data file")
    return cfg


def _field_names() -> list[str]:
    return [f"{f.section}.{f.name}" for f in C.flags() if f.section]


def form_fields() -> list[dict]:
    """Every config field the form can set: name, type, choices, default and help (from config.py)."""
    out = []
    for f in C.flags():
        if not f.section:
            continue
        kind = "bool" if f.type is bool else "int" if f.type is int else "float" if f.type is float else \
            "list" if getattr(f.type, "__origin__", None) is list else "text"
        out.append({"key": f"{f.section}.{f.name}", "type": kind, "choices": list(C.choices(f.type)),
                    "default": f.default, "help": f.help})
    return out


def plan_text(cfg: C.RunConfig, gpu_memory: str) -> dict:
    """``qfine plan``'s table for ``cfg`` on a GPU of ``gpu_memory``, and its verdict (the last line)."""
    from qfine.api import plan

    text = plan(cfg, gpu_memory=gpu_memory or "24GiB")
    lines = [line for line in text.splitlines() if line.strip()]
    return {"text": text, "verdict": lines[-1] if lines else ""}


def _tokenizer(source: str):
    from qfine.models.loading import load_tokenizer
    from qfine.models.sources import resolve_source

    with _cache_lock:
        if source not in _tokenizers:
            _tokenizers[source] = load_tokenizer(resolve_source(source))
        return _tokenizers[source]


def preview_text(path: Path, source: str, data: C.DataConfig, example: int = 0) -> str:
    """``qfine data preview``'s text: detected format, one rendered row with the scored tokens marked,
    token lengths. Preference pairs are shown as pairs."""
    from qfine.data.preview import preview
    from qfine.objectives import pref_data

    data.path = str(path)
    tokenizer = _tokenizer(source)
    out = io.StringIO()
    kind = pref_data.row_kind(str(path), data)
    if kind is not None:
        pref_data.preview(str(path), tokenizer, data, out, example, paired=kind == "pairs")
    else:
        preview(str(path), tokenizer, data, out, example)
    return out.getvalue()


def run_detail(run_dir: Path, metrics: Metrics) -> dict:
    """One run's page: its summary row, resolved config, data record, report and exports."""
    out = summary(run_dir, metrics)
    out["config"] = _text(run_dir / "config.yaml")
    data = _text(run_dir / "data.json")
    try:
        out["data"] = json.loads(data) if data else None
    except ValueError:
        out["data"] = None
    out["report"] = (run_dir / "report.html").is_file()
    out["adapter"] = (run_dir / "adapter").is_dir()
    out["checkpoints"] = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) \
        if (run_dir / "checkpoints").is_dir() else []
    out["exports"] = exports(run_dir)
    return out


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""
