"""Disk space a run's outputs need, checked before the first step: a run that fills the disk at
its third checkpoint has wasted the hours before it.

A checkpoint holds the trainable weights (fp32: 4 bytes each), the optimizer's state (AdamW: two
fp32 moments, 8 bytes per parameter; the 8-bit optimizers: 2) and a few small files (scheduler, RNG
states, trainer state, tokenizer: :data:`SMALL`). transformers writes the newest checkpoint before
it deletes the oldest beyond ``save_total_limit``, so ``limit + 1`` are on disk at once; the final
adapter comes on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from qfine.config import RunConfig
from qfine.util.errors import QfineError
from qfine.util.files import free_bytes, human_bytes

SMALL = 16 * 2**20  # tokenizer (a Llama 3 tokenizer.json is 9 MB, saved with each checkpoint), RNG, states


def optimizer_bytes_per_param(optimizer: str) -> int:
    return 2 if "8bit" in optimizer else 8


@dataclass
class DiskNeed:
    per_checkpoint: int  # bytes
    checkpoints: int  # on disk at once
    adapter: int  # bytes of the final adapter
    free: int  # bytes free on the output's file system

    @property
    def total(self) -> int:
        return self.per_checkpoint * self.checkpoints + self.adapter

    @property
    def fits(self) -> bool:
        return self.free >= self.total

    def line(self, where: Path) -> str:
        return (f"disk: {human_bytes(self.free)} free for {where}; the run needs about {human_bytes(self.total)} "
                f"({self.checkpoints} checkpoint{'s' if self.checkpoints != 1 else ''} of "
                f"{human_bytes(self.per_checkpoint)} at once + the adapter)")


def checkpoints_at_once(cfg: RunConfig, resume: bool = False) -> int:
    """Checkpoints on disk at the fullest moment (a resumed run's own are counted in the free space)."""
    t = cfg.train
    if t.save_steps <= 0:
        return 1  # a stop still writes one
    if resume:
        return 1  # the older ones are on disk already, and the oldest goes once the new one is whole
    if t.save_total_limit > 0:
        return t.save_total_limit + 1
    return max(1, math.ceil(t.max_steps / t.save_steps)) if t.max_steps > 0 else 1


def need(cfg: RunConfig, trainable_params: int, resume: bool = False) -> DiskNeed:
    weights = 4 * trainable_params
    per = weights + trainable_params * optimizer_bytes_per_param(cfg.train.optimizer) + SMALL
    return DiskNeed(per, checkpoints_at_once(cfg, resume), weights + SMALL, free_bytes(cfg.output_dir))


def check(cfg: RunConfig, trainable_params: int, resume: bool = False) -> str:
    """The disk line for a run of ``trainable_params``; :class:`QfineError` when the output directory's
    file system has less free space than the run's outputs need."""
    n = need(cfg, trainable_params, resume)
    where = Path(cfg.output_dir)
    if not n.fits:
        raise QfineError(f"output dir {where}: {human_bytes(n.free)} free on its file system, but the run's "
                         f"checkpoints and adapter need about {human_bytes(n.total)} ({n.checkpoints} × "
                         f"{human_bytes(n.per_checkpoint)} + {human_bytes(n.adapter)}); free some space, lower "
                         "train.save_total_limit, or choose another --output-dir")
    return n.line(where)
