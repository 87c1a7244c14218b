"""The private symbols of other libraries that qfine.compat.torch reaches still exist and mean what it assumes."""

from __future__ import annotations

import torch

from qfine.compat.torch import set_last_lr


def test_set_last_lr_is_what_get_last_lr_returns():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    set_last_lr(sched, [0.25])
    assert sched.get_last_lr() == [0.25]
