"""Every private symbol of another library that qfine reaches (qfine.compat) still exists and means what
qfine assumes: an upgrade that changes one fails here, by name."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from peft import LoraConfig

from qfine.compat import peft as peft_compat
from qfine.compat import torch as torch_compat
from qfine.compat import transformers as tf_compat


def test_set_last_lr_is_what_get_last_lr_returns():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    torch_compat.set_last_lr(sched, [0.25])
    assert sched.get_last_lr() == [0.25]


def test_foreach_norm_and_zero():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    assert [float(n) for n in torch_compat.foreach_norm([a, b])] == [5.0, 5.0]
    torch_compat.foreach_zero_([a, b])
    assert not a.any() and not b.any()


def test_persistent_buffers_leave_out_the_non_persistent_ones():
    m = torch.nn.Module()
    m.register_buffer("kept", torch.ones(1))
    m.register_buffer("dropped", torch.ones(1), persistent=False)
    assert [n for n, _ in torch_compat.persistent_buffers(m)] == ["kept"]
    assert set(m.state_dict()) == {"kept"}


def test_is_dropout_and_mark_dynamic():
    assert torch_compat.is_dropout(torch.nn.Dropout(0.1)) and torch_compat.is_dropout(torch.nn.Dropout2d())
    assert not torch_compat.is_dropout(torch.nn.Linear(2, 2))
    torch_compat.mark_dynamic(torch.zeros(4, 3), 0)


def test_peft_registers_a_custom_layer_class():
    cfg = LoraConfig(target_modules=["x"])
    peft_compat.register_custom_module(cfg, {torch.nn.Identity: torch.nn.Identity})
    assert torch.nn.Identity in cfg._custom_modules


def test_the_attention_implementation_is_read_and_selected_through_the_config(tiny_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert tf_compat.attn_implementation(model.config) == "sdpa"
    tf_compat.set_attn_implementation(model.config, "eager")
    assert model.config._attn_implementation == "eager"


def test_decoder_layers_hold_their_checkpointing_function(tiny_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.gradient_checkpointing_enable()
    assert callable(getattr(model.model.layers[0], tf_compat.CHECKPOINT_FUNC))


@pytest.mark.parametrize("name, params", sorted(tf_compat.TRAINER_OVERRIDES.items()))
def test_the_trainer_methods_qfine_overrides_still_exist(name, params):
    method = getattr(transformers.Trainer, name, None)
    assert callable(method), f"transformers.Trainer.{name} is gone: qfine's trainers override it"
    got = list(inspect.signature(method).parameters)[1:]
    assert got[:len(params)] == list(params), (name, got)


def test_shutdown_workers_stops_a_persistent_loaders_workers_at_once():
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    first = next(iter(loader))  # an iteration left unfinished, as an interrupted epoch leaves it
    assert first.tolist() == [0, 1]
    workers = list(loader._iterator._workers)
    assert all(w.is_alive() for w in workers)
    torch_compat.shutdown_workers(loader)
    assert not any(w.is_alive() for w in workers) and loader._iterator is None


def test_trl_grpo_generation_method_and_metrics():
    """GRPOTrainer still generates through the method qfine's GRPO trainer overrides, with the parameters
    it passes on, and still averages its rollout metrics from ``_metrics``."""
    from trl import GRPOTrainer

    from qfine.compat import trl as trl_compat

    method = getattr(GRPOTrainer, trl_compat.GRPO_GENERATE)
    assert tuple(inspect.signature(method).parameters)[1:] == trl_compat.GRPO_GENERATE_PARAMS
    assert f"self.{trl_compat.GRPO_GENERATE}(" in inspect.getsource(GRPOTrainer._generate)
    assert "self._metrics = {" in inspect.getsource(GRPOTrainer.__init__)
    assert 'self._metrics[mode]["completions/mean_length"]' in inspect.getsource(GRPOTrainer._generate)
