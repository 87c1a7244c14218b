"""Reference log-probabilities computed once (``train.reference_logps: precompute``, DPO).

Before the first step, every pair of the train and eval data goes through the reference model (the
same quantized base with the adapter off, or ``--init-adapter``'s adapter, frozen; through the same
kernels as the live reference) and the summed log-probabilities of its chosen and rejected replies
are stored in the run directory as ``reference_logps.safetensors``: fp32 tensors ``{split}_chosen``
and ``{split}_rejected`` of shape (rows,), indexed by the pair's place in its dataset (the ``row``
column the collator passes on). ``--resume`` reads the file instead of recomputing it; a file whose
row count or data fingerprint differs from the data being trained on is refused by name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from qfine.fast import step
from qfine.methods.lora import reference_model
from qfine.objectives import pref_data
from qfine.util.errors import QfineError

FILE = "reference_logps.safetensors"


def fingerprint(ds) -> str:
    """SHA-256 (16 hex digits) of every pair's token ids, in dataset order."""
    h = hashlib.sha256()
    for row in ds:
        for key in ("chosen_ids", "rejected_ids", "chosen_labels", "rejected_labels"):
            h.update(torch.tensor(row[key], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute(model, ds, logps, pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed reference log-probabilities (rows,) fp32 of every pair of ``ds``;
    ``logps(model, ids, mask, labels) -> (logp, count)`` is the objective's own scoring."""
    collate = pref_data.PairCollator(pad_id)
    chosen, rejected = [], []
    device = next(model.parameters()).device
    # the model stays in training mode: the fast path's fused layers serve training-mode forwards, and the
    # live reference pass runs there too (the adapter is off, so LoRA dropout does not apply)
    was_training = model.training
    model.train()
    try:
        with reference_model(model), step.step_mode(reference=True):
            for start in range(0, len(ds), batch_size):
                batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
                logp, _ = logps(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
                half = logp.shape[0] // 2
                chosen.append(logp[:half].float().cpu())
                rejected.append(logp[half:].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def table(run_dir: str | Path, model, splits: dict, logps, pad_id: int, batch_size: int) -> dict[str, torch.Tensor]:
    """The run's reference log-probabilities, read from ``run_dir/FILE`` or computed for ``splits``
    (name → dataset) and written there atomically."""
    from safetensors.torch import load_file, safe_open, save_file

    path = Path(run_dir) / FILE
    marks = {name: fingerprint(ds) for name, ds in splits.items() if ds is not None}
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            stored = f.metadata() or {}
        for name, mark in marks.items():
            if stored.get(name) != mark:
                raise QfineError(f"{path} holds reference log-probabilities of other {name} data than this run's "
                                 f"(fingerprint {stored.get(name)} ≠ {mark}); remove it to compute them again")
        print(f"[qfine] reference log-probabilities read from {path}", flush=True)
        return load_file(str(path))
    out = {}
    for name, ds in splits.items():
        if ds is not None:
            out[f"{name}_chosen"], out[f"{name}_rejected"] = compute(model, ds, logps, pad_id, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(out, str(tmp), metadata=marks)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    print(f"[qfine] reference log-probabilities of {sum(len(v) for k, v in out.items() if k.endswith('_chosen'))} "
          f"pairs computed once and stored in {path}", flush=True)
    return out
