"""The original (pristine) weights of a model source, read by key from its safetensors files.

Used where the 16-bit checkpoint rather than the quantized copy must be read: ``merge --base pristine``,
LoftQ's quantization error, adaptive quantization's int8 layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from qfine.util.errors import QfineError


def pristine_reader(source: str, need: str = "--base pristine") -> Callable[[str], torch.Tensor]:
    """Read original weights by key from the safetensors files of a local or cached base folder;
    ``need`` names what asked for them in the error messages."""
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as e:  # noqa: BLE001 - any hub failure means the weights are not here
            raise QfineError(f"{need} needs the original weights of {source} on disk ({e})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QfineError(f"{need}: no .safetensors weights in {folder}")
    where = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                where[k] = f

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise QfineError(f"{need}: weight {key} not found in {folder}")
        with safe_open(where[key], "pt") as h:
            return h.get_tensor(key)

    return read
