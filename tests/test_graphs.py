"""qfine.fast.graphs on CPU: the eager fallback and the gradient-buffer bookkeeping that replays rely on.
(The captured path itself is tested on the GPU: tests/test_gpu_fast.py::test_cuda_graph_step_equals_eager_step.)"""

from __future__ import annotations

import torch

from qfine.fast.graphs import GraphedStep, random_modules


def test_cpu_step_runs_eagerly_and_accumulates():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)

    def fwd_bwd(inp):
        loss = lin(inp).square().mean()
        loss.backward()
        return loss.detach()

    step = GraphedStep(fwd_bwd, lin.parameters(), warmup=0)
    first = step(inp=x)
    g1 = lin.weight.grad.clone()
    second = step(inp=x)
    assert step.graphs == 0 and torch.equal(first, second)
    torch.testing.assert_close(lin.weight.grad, 2 * g1)  # accumulated like any eager backward


def test_dropout_refuses_capture_with_the_module_named():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Dropout(0.0))
    assert random_modules(model) == ["1"]
    step = GraphedStep(lambda: None, model.parameters(), model=model)
    assert step.reason.startswith("random modules in training (1)")


def test_int8_layers_refuse_capture_with_a_layer_named():
    """LLM.int8() synchronises with the host; a capture through it fails and leaves the CUDA generator
    broken for the process (seen on the GPU), so the refusal comes before any capture is tried."""
    import bitsandbytes as bnb

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False))
    step = GraphedStep(lambda: None, model.parameters(), model=model)
    assert step.reason == ("1 bitsandbytes int8 layers (1, ...): their matmul reads outlier columns on the host, "
                           "which a capture cannot do")
    assert GraphedStep(lambda: None, model[0].parameters(), model=model[0]).reason is None


def test_bind_grads_rebinds_zeroes_dropped_and_copies_replaced():
    """Replays add into fixed buffers: after zero_grad(set_to_none=True) the buffer must come back zeroed,
    after a user replaced .grad its values must be copied in, and an untouched .grad must be kept as is."""
    a, b, c, d = (torch.nn.Parameter(torch.ones(3)) for _ in range(4))
    for p in (a, b, c):
        p.grad = torch.full((3,), 5.0)
    step = GraphedStep(lambda: None, [a, b, c, d])
    step._bind_grads()
    assert d.grad.tolist() == [0.0] * 3  # no gradient yet: its buffer starts at zero
    bufs = [a.grad, b.grad, c.grad]
    a.grad = None
    b.grad = torch.full((3,), 7.0)
    step._bind_grads()
    assert a.grad is bufs[0] and b.grad is bufs[1] and c.grad is bufs[2]
    assert a.grad.tolist() == [0.0] * 3 and b.grad.tolist() == [7.0] * 3 and c.grad.tolist() == [5.0] * 3
