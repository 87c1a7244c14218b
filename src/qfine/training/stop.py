"""Stopping a run cleanly when the machine is taken away (SIGTERM from SLURM, a spot instance, a
container runtime), on Ctrl-C (SIGINT), or when a caller asks (a UI's Stop button).

A :class:`StopRequest` is a flag. :func:`signals_stop` points SIGTERM and SIGINT at it while a run
is in progress; the first signal only raises the flag and puts the previous handlers back, so a
second signal acts at once (SIGTERM's default ends the process, SIGINT raises KeyboardInterrupt).
:class:`StopAtStep` reads the flag at the end of each optimizer step and turns it into the
Trainer's own controls: log the step, save a checkpoint (sealed by
:class:`~qfine.training.resume.CheckpointSeal`), skip a scheduled evaluation, end the loop. The run
then writes its report and raises :class:`Stopped`, which the CLI turns into exit status 128 +
signal number (143 for SIGTERM, 130 for SIGINT) with the command that continues the run.

Under a launcher the ranks must stop at the same step or the collectives of the next step hang: each
rank's flag is all-reduced (max) over a gloo group without waiting, and read one step later, so all
ranks see the same value at the same step and the GPU's queue is never drained for it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from transformers import TrainerCallback

from qfine.util import distributed
from qfine.util.errors import QfineError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A request to end the run after the current optimizer step; ``signum`` when a signal made it."""

    def __init__(self):
        self.reason: str | None = None
        self.signum: int | None = None

    def request(self, reason: str = "a stop request", signum: int | None = None) -> None:
        if self.reason is None:
            self.reason, self.signum = reason, signum

    @property
    def requested(self) -> bool:
        return self.reason is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, the status a shell reports for a process that signal ended."""
        return 128 + (self.signum or signal.SIGTERM)


class Stopped(QfineError):
    """The run ended early on a stop request; ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def signals_stop(request: StopRequest) -> Iterator[StopRequest]:
    """Route SIGTERM and SIGINT to ``request`` inside the block (main thread only: Python delivers
    signals there, so a run started from another thread is stopped through ``request`` itself)."""
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)

    def on_signal(signum, frame):
        request.request(signal.Signals(signum).name, signum)
        restore()  # a second signal is not caught: it stops at once

    for s in SIGNALS:
        signal.signal(s, on_signal)
    try:
        yield request
    finally:
        restore()


def check_stop(request: StopRequest | None, where: str) -> None:
    """Raise :class:`Stopped` when a stop was requested before training began (nothing to save)."""
    if request is not None and request.requested:
        raise Stopped(f"stopped by {request.reason} {where}; nothing was trained", request.exit_code)


class StopAtStep(TrainerCallback):
    """End training at a step boundary once ``request`` is raised (on any rank), saving a checkpoint
    of that step. ``stopped_at``: the optimizer step the run ended at, or None."""

    def __init__(self, request: StopRequest):
        self.request = request
        self.stopped_at: int | None = None
        self._group = None
        self._flag = None
        self._pending = None  # the all-reduce started at the previous step end

    def on_train_begin(self, args, state, control, **kwargs):
        if distributed.world_size() > 1:
            import torch
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # CPU tensors, whatever the training backend
            self._flag = torch.zeros(1, dtype=torch.int32)

    def _agreed(self) -> bool:
        """Whether to stop now: the local flag in one process; under a launcher, the max over the
        ranks of the flags sent at the previous step end (the same answer on every rank)."""
        if self._group is None:
            return self.request.requested
        import torch.distributed as dist

        stop = False
        if self._pending is not None:
            self._pending.wait()
            stop = bool(self._flag.item())
        self._flag.fill_(int(self.request.requested))
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return stop

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            self.stopped_at = state.global_step
            control.should_log = True
            control.should_save = True
            control.should_evaluate = False  # prompt: the time before SIGKILL is short
            control.should_training_stop = True
            if not self.request.requested:  # another rank's signal: say why here too
                self.request.request("a stop on another rank")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            self._pending.wait()  # every rank has joined the last all-reduce
            self._pending = None
