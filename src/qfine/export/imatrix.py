"""An importance matrix for the K-quants, from the run's own training data.

llama.cpp's ``llama-imatrix`` runs a model over calibration text and keeps, for every matrix
multiplication, the mean square of each input column: how much an error in that column of the
weight moves the output. Its quantizers then weigh each value's error by it (``qw · sqrt(σ² + x²)``
for Q4_K/Q5_K, ``qw`` for Q6_K; :mod:`.kquants`). qfine computes the same statistic in-process with
forward hooks on the merged model's linear layers, over the rows the run was trained on (its data
is what the model will see), so no llama.cpp binary and no separate calibration file is needed.

Whether it helps is measured per tensor: :func:`qfine.export.gguf_file.write_gguf` encodes each
K-quant tensor with and without it and keeps the encoding with the lower importance-weighted error,
Σ_columns imp · Σ_rows (x̂ − x)² (the quantity both searches minimise a proxy of).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from qfine.export import layout

MAX_TOKENS = 32768  # calibration tokens: llama.cpp's own default is 512-token chunks of a few hundred KB of text
MIN_TOKENS = 1024  # distinct tokens: below this the statistic follows one sentence's activations (a run of 8
# copies of one 49-token row raised q4_k_m's KL on that very row from 0.30 to 0.35 nats; 2,043 tokens of
# README paragraphs lowered the bundled model's KL on other text from 0.071 to 0.039)
MAX_ROW_TOKENS = 1024


def training_rows(source: str, tokenizer, data: str | None):
    """(rows, where): the tokenized rows of ``data`` or, for a run, all of its training rows (read with
    the run's data settings, no eval split held back, in memory); ``(None, "")`` for a model folder
    without ``data``."""
    from qfine import config as C
    from qfine.data.pipeline import build_datasets

    if data:
        cfg, where = C.DataConfig(path=data), data
    elif (Path(source) / "config.yaml").is_file():
        cfg = C.load_yaml(Path(source) / "config.yaml").data
        where = f"{cfg.path} (the run's training rows)"
        cfg = C.DataConfig(**{**vars(cfg), "eval_path": None, "eval_ratio": 0.0, "streaming": False})
    else:
        return None, ""
    return build_datasets(tokenizer, cfg)[0], where


def training_sequences(source: str, tokenizer, data: str | None) -> tuple[list[list[int]], str]:
    """Token ids of up to :data:`MAX_TOKENS` tokens of ``data`` or, for a run, of its training rows;
    ``([], why)`` when there is nothing to calibrate on, or fewer than :data:`MIN_TOKENS` tokens.
    A row seen before is skipped: repeats would weigh one text's activations several times."""
    rows, where = training_rows(source, tokenizer, data)
    if rows is None:
        return [], "no training data for a model folder (pass --imatrix-data FILE)"
    out, total, seen = [], 0, set()
    for row in rows:
        ids = list(row["input_ids"][:MAX_ROW_TOKENS])
        if tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        out.append(ids)
        total += len(ids)
        if total >= MAX_TOKENS:
            break
    if total < MIN_TOKENS:
        return [], (f"only {total:,} tokens in the distinct rows of {where}, fewer than {MIN_TOKENS:,} "
                    "(pass --imatrix-data FILE)")
    return out, f"{total:,} tokens of {where}"


@torch.no_grad()
def collect(model, sequences: list[list[int]]) -> dict[str, np.ndarray]:
    """GGUF tensor name → (in_features,) fp32 mean square of that linear layer's inputs over every
    token of ``sequences``, run one at a time (no padding) through ``model`` merged in fp32."""
    from qfine.methods.lora import merged

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name):
        def pre(_module, args):
            x = args[0] if args else None
            if not torch.is_tensor(x) or not x.is_floating_point():
                return
            x = x.detach().float().reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return pre

    device = next(model.parameters()).device
    # the merge swaps each LoRA layer for a plain Linear: hook the layers that will run
    with merged(model, torch.float32) if hasattr(model, "peft_config") else contextlib.nullcontext():
        for name, module in model.named_modules():
            gname = layout.gguf_name(name.removeprefix("base_model.model.") + ".weight")
            if gname and gname != "token_embd.weight" and gname not in counts and not name.endswith("base_layer"):
                counts[gname] = 0
                handles.append(module.register_forward_pre_hook(hook(gname)))
        try:
            for ids in sequences:
                model(input_ids=torch.tensor([ids], device=device))
        finally:
            for h in handles:
                h.remove()
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums if counts[name]}


def weighted_error(decoded: np.ndarray, x: np.ndarray, importance: np.ndarray) -> float:
    """Σ_columns imp · Σ_rows (decoded − x)² of a (rows, n) tensor (float64)."""
    d = decoded.reshape(-1, x.shape[-1]).astype(np.float64) - x.reshape(-1, x.shape[-1])
    return float((importance.astype(np.float64) * (d * d).sum(axis=0)).sum())
