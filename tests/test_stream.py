"""Weight streaming (qfine/fast/stream.py): the decoder layers' frozen tensors live off the device and
come back one layer ahead. On the CPU the schedule runs with ``poison=True``: an evicted tensor reads
as NaN (floats) or zero bytes (4-bit codes), so a weight used outside its window changes the loss or a
gradient, and the comparisons below fail. Every tensor is streamed (``min_bytes=0``), norms included."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import TINY_VOCAB as VOCAB
from helpers import lora_model
from qfine.fast import apply_fast_path, offload_checkpoints
from qfine.fast.stream import install, stream_of


def _batch(seed, bsz=2, seq=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (bsz, seq), generator=g)
    return ids, ids.clone()


def _step(model, batches):
    """Losses of a gradient-accumulation step over ``batches`` and the summed LoRA gradients."""
    model.zero_grad(set_to_none=True)
    losses = []
    for ids, labels in batches:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        losses.append(float(loss.detach()))
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _model(tmp_path, save_tiny, quantization, layers=4):
    model = lora_model(save_tiny(tmp_path / "m", num_hidden_layers=layers), quantization)
    assert apply_fast_path(model).fused == layers
    return model


@pytest.mark.parametrize("quantization,offload", [("nf4", False), ("nf4", True), ("none", False)])
def test_streamed_checkpointed_training_equals_resident(tmp_path, save_tiny, quantization, offload):
    model = _model(tmp_path, save_tiny, quantization)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    apply_fast_path(model)
    if offload:
        assert offload_checkpoints(model) == 4
    batches = [_batch(1), _batch(2)]
    ref_losses, ref_grads = _step(model, batches)
    with torch.no_grad():
        ref_logits = model.eval()(input_ids=batches[0][0]).logits
    model.train()
    keys = list(model.state_dict())

    # a frozen adapter (a multi-task run's other tasks) is not streamed: it may train later
    frozen = {id(p): p for n, p in model.named_parameters() if "lora_" in n and ".1." in n}
    for p in frozen.values():
        p.requires_grad_(False)
    stream = install(model, "cpu", min_bytes=0, poison=True)
    for p in frozen.values():
        p.requires_grad_(True)
    assert stream_of(model) is stream and install(model, "cpu") is stream
    assert stream.streamed_bytes > 0 and all(stream.slots)
    assert not any(id(s.owner) in frozen for slots in stream.slots for s in slots)
    layer = model.get_base_model().model.layers[1]
    assert torch.isnan(layer.input_layernorm.weight).all()  # evicted: poison in place
    losses, grads = _step(model, batches)
    # each layer is fetched once for the forward and once for its recompute, per micro-batch
    assert stream.fetches == 2 * 4 * len(batches)
    assert stream.max_resident <= 2 and not stream.copies, (stream.max_resident, list(stream.copies))
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)
    worst = max(float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items())
    assert worst < 1e-6, worst
    with torch.no_grad():  # eval forwards stream the same way and leave nothing behind
        logits = model.eval()(input_ids=batches[0][0]).logits
    assert not stream.copies and torch.allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == keys

    stream.remove()
    assert stream_of(model) is None and not torch.isnan(layer.input_layernorm.weight).any()
    model.train()
    again, _ = _step(model, batches)
    assert again == pytest.approx(ref_losses, rel=1e-6, abs=0)


def test_the_last_layers_can_stay_on_the_device(tmp_path, save_tiny):
    model = _model(tmp_path, save_tiny, "nf4")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    apply_fast_path(model)
    batches = [_batch(4)]
    ref_losses, ref_grads = _step(model, batches)
    stream = install(model, "cpu", min_bytes=0, poison=True, keep_last=3)
    assert [bool(s) for s in stream.slots] == [True, False, False, False]
    losses, grads = _step(model, batches)
    assert stream.fetches == 2 and not stream.copies
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)
    assert max(float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items()) < 1e-6


def test_streaming_without_checkpointing_keeps_layers_until_their_backward(tmp_path, save_tiny):
    """Correct but no saving: every graded forward keeps its layer until its input's gradient is done."""
    model = _model(tmp_path, save_tiny, "nf4", layers=3)
    batches = [_batch(3)]
    ref_losses, ref_grads = _step(model, batches)
    stream = install(model, "cpu", min_bytes=0, poison=True)
    seen = []
    stream_drop = stream.drop

    def drop(i):
        seen.append((i, len(stream.copies)))
        stream_drop(i)

    stream.drop = drop
    losses, grads = _step(model, batches)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)
    assert max(float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items()) < 1e-6
    # dropped last layer first, in the backward, with all three still there when the first went; the
    # first layer's input (the frozen embedding's output) carries no gradient, so nothing marks the end
    # of its backward and it stays (one layer, never wrong: its next forward finds it in place)
    assert [i for i, _ in seen] == [2, 1] and seen[0][1] == 3 and set(stream.copies) == {0}


def test_pinned_host_memory_is_checked_before_it_is_needed(tmp_path, monkeypatch, save_tiny):
    """Pinned memory cannot be swapped out: streamed weights or offloaded checkpoints that the host
    cannot hold are refused (``on``, offload) or not chosen (``auto``) before the run, with the sizes."""
    from transformers import LlamaConfig

    from qfine import config as C
    from qfine.memory import estimate as memory
    from qfine.memory import fit
    from qfine.objectives import OBJECTIVES
    from qfine.training.decide import streaming
    from qfine.util.errors import QfineError

    sft = OBJECTIVES["sft"]
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(tmp_path / "70b")
    cfg = C.RunConfig()
    cfg.model.source = str(tmp_path / "70b")
    cfg.lora.r, cfg.data.max_seq_len, cfg.train.batch_size = 64, 2048, 1
    monkeypatch.setattr(memory, "host_available", lambda: 16 * 2**30)
    monkeypatch.setattr(fit, "gpu_budget", lambda: 24 * 2**30)
    assert streaming(cfg, sft, "cuda") == fit.StreamChoice(
        False, 0, "weight streaming off: the streamed weights need 36.7 GiB of pinned host memory and this "
                  "machine has 16.0 GiB available")  # 80 layers, 0.459 GiB each
    cfg.train.stream_weights = "on"
    with pytest.raises(QfineError, match=r"train.stream_weights on: the streamed weights need 36.7 GiB of pinned "
                                         r"host memory and this machine has 16.0 GiB available"):
        streaming(cfg, sft, "cuda")

    model = lora_model(save_tiny(tmp_path / "m"), "none")
    shapes = memory.Shapes.from_config(model.get_base_model().config)
    tokens = 8 * 4096  # 2 layers × 64 × 32,768 tokens × 2 bytes = 8 MiB
    monkeypatch.setattr(memory, "host_available", lambda: 4 * 2**20)
    assert fit.offload_shortfall(shapes, tokens) == (
        "the offloaded checkpoints (2 layer inputs) need 8.0 MiB of pinned host memory and this machine has 4.0 MiB "
        "available: lower data.max_seq_len or train.batch_size, or keep the checkpoints on the GPU "
        "(train.offload_checkpoints: false, train.auto_memory: false)")
    monkeypatch.setattr(memory, "host_available", lambda: 9 * 2**20)
    assert fit.offload_shortfall(shapes, tokens) is None
    monkeypatch.setattr(memory, "host_available", lambda: None)  # unreadable: not checked
    cfg.train.stream_weights = "on"
    assert streaming(cfg, sft, "cuda").stream is True


def test_streaming_needs_decoder_layers():
    with pytest.raises(ValueError, match="model.layers"):
        install(torch.nn.Linear(2, 2), "cpu")


def test_auto_streams_only_when_the_weights_do_not_fit(tmp_path, monkeypatch):
    """train.stream_weights auto: decided from config.json and the GPU budget before anything loads."""
    from transformers import LlamaConfig

    from qfine import config as C
    from qfine.memory import estimate as memory
    from qfine.memory import fit, plan
    from qfine.objectives import OBJECTIVES
    from qfine.training.decide import streaming
    from qfine.util.errors import QfineError

    sft = OBJECTIVES["sft"]
    monkeypatch.setattr(memory, "host_available", lambda: 2**40)  # a host that can pin the weights
    c70 = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    c70.save_pretrained(tmp_path / "70b")
    cfg = C.RunConfig()
    cfg.model.source = str(tmp_path / "70b")
    cfg.lora.r, cfg.data.max_seq_len, cfg.train.batch_size = 64, 2048, 1
    cfg.train.optimizer = "paged_adamw_8bit"
    layer = plan.layer_bytes(c70, "nf4")
    for gib, expected in ((80, False), (24, True), (30, True), (6, False)):  # fits / streamed / streamed / nothing
        monkeypatch.setattr(fit, "gpu_budget", lambda gib=gib: gib * 2**30)
        stream, keep, line = dataclasses.astuple(streaming(cfg, sft, "cuda"))
        assert stream is expected, (gib, line)
        assert (line is not None) is expected
        if stream:
            # the layers kept on the GPU fill the room the streamed estimate leaves, less one layer
            room = 0.92 * gib * 2**30 - float(line.split("streamed: ")[1].split(" GiB")[0]) * 2**30
            assert keep == pytest.approx(room / layer - 1, abs=1.1), (gib, keep, line)
            assert f"the last {keep} of 80 layers keep their weights on the GPU" in line
    monkeypatch.setattr(fit, "gpu_budget", lambda: 24 * 2**30)
    assert "is more than 92% of the 24.0 GiB free" in streaming(cfg, sft, "cuda").line
    cfg.train.stream_weights = "off"
    assert streaming(cfg, sft, "cuda") == fit.StreamChoice(False, 0, None)
    cfg.train.stream_weights = "on"
    assert streaming(cfg, sft, "cpu").stream is False  # nothing to stream from: a note, no error
    cfg.model.quantization = "int8"
    with pytest.raises(QfineError, match="4-bit bases"):
        streaming(cfg, sft, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", [False, True])
def test_streamed_weights_on_cuda_give_the_same_step(tmp_path, save_tiny, offload):
    """bf16 on the GPU: the same kernels read the same bytes, streamed from pinned memory or resident,
    so loss and gradients are equal bit for bit; the device holds the streamed bytes no longer."""
    shape = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = lora_model(save_tiny(tmp_path / "g", **shape), "nf4", device="cuda", compute_dtype="bf16", dropout=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    assert apply_fast_path(model).fused == 4
    if offload:
        offload_checkpoints(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(ids, ids) for ids in (torch.randint(0, 2048, (2, 256), device="cuda", generator=g) for _ in range(2))]
    torch.manual_seed(3)
    ref_losses, ref_grads = _step(model, batches)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    stream = install(model, "cuda", min_bytes=4096)
    after = torch.cuda.memory_allocated()
    assert stream.streamed_bytes > 0 and before - after >= 0.9 * stream.streamed_bytes
    assert all(s.host.is_pinned() for slots in stream.slots for s in slots)
    torch.manual_seed(3)
    losses, grads = _step(model, batches)
    assert losses == ref_losses
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    assert stream.fetches == 2 * 4 * 2 and not stream.copies


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qfine_train_streams_the_weights_on_cuda(tiny_dir, tmp_path, capsys, monkeypatch):
    """`qfine train` with train.stream_weights on: says so, turns checkpointing on and CUDA graphs off,
    learns, answers the report's prompts (generation streams too) and records the setting."""
    import json

    import yaml

    from helpers import FACT, tiny_config, write_jsonl
    from qfine.fast import stream as stream_module
    from qfine.training import train

    monkeypatch.setattr(stream_module, "MIN_BYTES", 0)  # the tiny model's tensors are all small
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    run = train(tiny_config(tiny_dir, data, tmp_path / "run", stream_weights="on"))
    out = capsys.readouterr().out
    assert "weight streaming on (train.stream_weights)" in out
    assert "decoder layers in pinned host memory" in out and "weight streaming: 0.00 MiB" not in out
    assert "CUDA graphs off: weight streaming" in out
    losses = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert saved["stream_weights"] == "on" and saved["gradient_checkpointing"] is True
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
