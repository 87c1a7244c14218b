"""llama.cpp for the tests: node-llama-cpp's prebuilt CPU binaries (tools/llamacpp, installed by
`make test` from the npm registry), driven through tools/llamacpp/run.mjs by qfine.export.verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from qfine.export.verify import llamacpp, runtime_dir

GGML_BASE = (Path(__file__).resolve().parents[1] / "tools" / "llamacpp" / "node_modules" / "@node-llama-cpp" / "linux-x64"
             / "bins" / "linux-x64" / "libggml-base.so")  # llama.cpp's quantizers, for ctypes
needs_llamacpp = pytest.mark.skipif(runtime_dir() is None, reason="llama.cpp (tools/llamacpp: make test installs it) "
                                                                  "or node is missing")


def run(model: Path, tokenize=(), generate=(), lora: Path | None = None, timeout: int = 600) -> dict:
    """``{"tokens": [[ids]...], "generated": [text...], "warnings": [...]}`` from llama.cpp."""
    return llamacpp({"model": str(model), "lora": str(lora) if lora else None, "tokenize": list(tokenize),
                     "generate": [g if isinstance(g, dict) else {"prompt": g, "max_tokens": 24} for g in generate]},
                    timeout=timeout)
