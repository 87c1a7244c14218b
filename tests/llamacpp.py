"""llama.cpp for the tests: node-llama-cpp's prebuilt CPU binaries (tools/llamacpp, installed by
`make test` from the npm registry), driven through tools/llamacpp/run.mjs."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "llamacpp"


def available() -> bool:
    return shutil.which("node") is not None and (TOOL / "node_modules" / "node-llama-cpp").is_dir()


needs_llamacpp = pytest.mark.skipif(not available(), reason="llama.cpp (tools/llamacpp: make test installs it) "
                                                             "or node is missing")


def run(model: Path, tokenize=(), generate=(), lora: Path | None = None, timeout: int = 600) -> dict:
    """``{"tokens": [[ids]...], "generated": [text...], "warnings": [...]}`` from llama.cpp."""
    request = {"model": str(model), "lora": str(lora) if lora else None, "tokenize": list(tokenize),
               "generate": [g if isinstance(g, dict) else {"prompt": g, "max_tokens": 24} for g in generate]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        done = subprocess.run(["node", str(TOOL / "run.mjs"), f.name], capture_output=True, text=True,
                              timeout=timeout, cwd=TOOL)
    finally:
        Path(f.name).unlink()
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
