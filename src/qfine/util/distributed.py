"""Which process of a launched job this is: ``torchrun --nproc-per-node N -m qfine train …`` or
``accelerate launch -m qfine train …``.

Both launchers set ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; transformers' Trainer reads them
(through accelerate) and trains data-parallel: DDP all-reduces the LoRA gradients, and each rank
reads its own part of every global batch. What qfine adds is who writes. Rank 0 alone creates the
run directory and writes config.yaml, metrics.jsonl, checkpoints' seals, the report and the
adapter. The other ranks check the same things, wait at a barrier until the directory exists,
train, and write nothing. Each rank loads the base onto its own GPU (``cuda:LOCAL_RANK``), or onto
the CPU (the gloo backend).
"""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in a single process and on rank 0 of a launched job."""
    return rank() == 0


def cuda_device() -> str:
    """``cuda:LOCAL_RANK`` under a launcher (each rank's own GPU), else ``cuda``."""
    return f"cuda:{local_rank()}" if world_size() > 1 else "cuda"


def start(device: str) -> None:
    """Join the job's process group now (NCCL on GPUs, gloo on CPUs), before the run directory is
    touched, so ranks can wait for rank 0. accelerate's ``PartialState`` is the one Trainer reuses
    later. A single process does nothing."""
    if world_size() <= 1:
        return
    import torch
    from accelerate import PartialState

    if device == "cuda":
        torch.cuda.set_device(local_rank())
    PartialState(cpu=device == "cpu")


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world_size() <= 1:
        return
    from accelerate import PartialState

    PartialState().wait_for_everyone()
