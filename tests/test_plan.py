"""qfine plan: its parts against what the CPU measures on small models (bytes of the loaded weights,
peft's trainable-parameter count, the bytes autograd saves in a step), and the command on a folder
that holds only config.json."""

from __future__ import annotations

import pytest
import torch

from qfine import LoraSettings, add_lora, load_model
from qfine import config as C
from qfine.cli import main
from qfine.memory import estimate as memory
from qfine.memory.plan import trainable_params, weight_bytes


@pytest.fixture(autouse=True)
def roomy_disk(monkeypatch):
    """The plans here size 70B runs (checkpoints of ~9 GiB): this machine's free disk, which `qfine plan`
    also checks (tests/test_storage.py), must not decide whether their tables print."""
    monkeypatch.setattr("qfine.memory.disk.free_bytes", lambda path: 1 << 50)


@pytest.fixture(scope="module")
def mid_dir(tmp_path_factory, tokenizer_dir):
    """A 3-layer Llama, hidden 256 (large enough that bitsandbytes' per-layer tables do not matter)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mid") / "m"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def _stored_bytes(model) -> int:
    """Bytes of every distinct tensor the loaded model holds: parameters, buffers, bitsandbytes' absmax
    (and nested absmax), code tables and int8 row scales."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        extra = [getattr(t, "SCB", None)]
        if qs is not None:
            extra += [qs.absmax, qs.code, getattr(qs.state2, "absmax", None) if qs.state2 else None,
                      getattr(qs.state2, "code", None) if qs.state2 else None]
        for x in (x for x in extra if x is not None):
            seen[x.data_ptr()] = x.numel() * x.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("quantization", ["nf4", "int8", "int4", "none"])
def test_weight_bytes_from_the_config_match_the_loaded_model(mid_dir, quantization):
    model = load_model(str(mid_dir), quantization=quantization, compute_dtype="fp32").model
    predicted = weight_bytes(model.config, quantization, double_quant=True, group_size=32, dtype_bytes=4)
    assert predicted == pytest.approx(_stored_bytes(model), rel=0.02)


@pytest.mark.parametrize("lora", [dict(r=8), dict(r=4, target_modules=["q_proj", "v_proj"]),
                                  dict(r=4, variant="dora"), dict(r=2, trainable=["norm"])])
def test_trainable_parameters_are_peft_s_count(mid_dir, lora):
    cfg = C.RunConfig()
    cfg.lora = LoraSettings(**lora)
    loaded = load_model(str(mid_dir), compute_dtype="fp32", device="cpu")
    model = add_lora(loaded.model, cfg.lora)
    assert trainable_params(loaded.model.config, cfg) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_reference_layer_activations_match_the_bytes_autograd_saves(mid_dir):
    """peft's reference layers without dropout, fp32 on the CPU: the estimate within 10 % of the bytes the
    forward saves for the backward (the constant was measured on another shape and length)."""
    loaded = load_model(str(mid_dir), compute_dtype="fp32", device="cpu")
    model = add_lora(loaded.model, LoraSettings(r=16, alpha=32)).train()
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    ids = torch.randint(0, 1000, (3, 160), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    est = memory.estimate(memory.Shapes.from_config(loaded.model.config), 3 * 160, "none", 0, 0, fused=False,
                          act_bytes=4, dropout=False)
    measured = sum(saved.values())
    assert est.activations == pytest.approx(measured, rel=0.10), (est.activations, measured)


def test_plan_reads_a_folder_with_only_config_json(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(tmp_path / "70b")
    assert sorted(p.name for p in (tmp_path / "70b").iterdir()) == ["config.json"]
    args = ["plan", "--model", str(tmp_path / "70b"), "--lora-r", "64", "--batch-size", "1", "--max-seq-len", "2048"]
    assert main([*args, "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "nf4 base 36.8" in out
    rows = {(r[1], r[2]): r for r in (line.split() for line in out.splitlines() if line.strip().startswith("1 "))}
    assert list(rows) == [("none", "resident"), ("checkpoint", "resident"), ("offload", "resident"),
                          ("checkpoint", "streamed"), ("offload", "streamed")]
    # streamed, the GPU holds the 16-bit embedding and output layer (2 × 128256 × 8192 × 2 bytes) and two
    # decoder layers' NF4 weights instead of 80
    layer = (36.8 - 2 * 128256 * 8192 * 2 / 2**30) / 80
    assert float(rows[("offload", "streamed")][4]) == pytest.approx(36.8 - 78 * layer, abs=0.05)
    assert [r[-1] for r in rows.values()] == ["no", "no", "no", "yes", "yes"]
    assert "fastest that fits: --batch-size 1 --grad-accum 1 --gradient-checkpointing --stream-weights on" in out
    assert main([*args, "--gpu-memory", "6GiB"]) == 0
    assert "nothing fits: the frozen weights alone take 36.8 GiB" in capsys.readouterr().out
    assert main([*args, "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("1 ") and "resident" in line]
    assert [r[1] for r in rows] == ["none", "checkpoint", "offload"]
    fits = {r[1]: r[-1] for r in rows}
    peaks = {r[1]: float(r[3]) for r in rows}
    assert peaks["none"] > peaks["checkpoint"] > peaks["offload"]
    assert fits == {m: "yes" if peaks[m] <= 0.92 * 80 else "no" for m in fits}
    assert "fastest that fits: --batch-size 1" in out and "--stream-weights" not in out
    assert main(["plan", "--model", str(tmp_path / "nothing"), "--gpu-memory", "24GiB"]) == 2


def test_weight_bytes_of_the_8b_and_1b_shapes_match_the_gpu_s_measured_allocation():
    """torch.cuda.memory_allocated after loading NF4 + double quant (the values tests/test_config.py
    takes from docs/benchmarks.md: Llama-3.1-8B 5.36 GiB, Llama-3.2-1B 0.97 GiB)."""
    from transformers import LlamaConfig

    common = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    c8 = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False,
                     **common)
    c1 = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True, **common)
    assert weight_bytes(c8, "nf4") / memory.GIB == pytest.approx(5.36, rel=0.02)
    assert weight_bytes(c1, "nf4") / memory.GIB == pytest.approx(0.97, rel=0.02)


def test_host_memory_of_streamed_weights_and_offloaded_inputs(mid_dir, save_tiny, tmp_path):
    """The pinned host bytes the plan counts: the streamed tensors of a real NF4 layer, each rounded up
    to a power of two as torch's pinned cache holds it, and one layer input per layer when offloaded."""
    from transformers import AutoConfig

    from helpers import lora_model
    from qfine.fast import apply_fast_path
    from qfine.fast.stream import install
    from qfine.memory.plan import _pow2ceil, host_layer_bytes, layer_bytes

    model = lora_model(save_tiny(tmp_path / "m", num_hidden_layers=2, hidden_size=256, intermediate_size=704,
                                 num_attention_heads=8, num_key_value_heads=2), "nf4")
    apply_fast_path(model)
    config = model.get_base_model().config
    stream = install(model, "cpu", min_bytes=1024)
    counted = sum(_pow2ceil(s.host.numel() * s.host.element_size()) for s in stream.slots[0])
    assert counted == host_layer_bytes(config, "nf4", dtype_bytes=4, min_bytes=1024)  # fp32 norms on the CPU
    assert counted > layer_bytes(config, "nf4")  # 704-wide projections are not powers of two
    stream.remove()

    shapes = memory.Shapes.from_config(config)
    offloaded = memory.estimate(shapes, 4 * 512, "offload", 10, 10)
    assert offloaded.host == 2 * 256 * 4 * 512 * 2  # two layers' inputs, bf16
    assert memory.estimate(shapes, 4 * 512, "checkpoint", 10, 10).host == 0
    streamed = memory.estimate(shapes, 4 * 512, "offload", 10**6, 10, layer_bytes=1000, host_layer_bytes=1500)
    assert streamed.host == offloaded.host + 2 * 1500
    c70 = AutoConfig.for_model("llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    # a 70B layer's NF4 tensors: 0.411 GiB, held as 0.459 (the 112 MiB gate/up/down take 128 each)
    # packed gate/up/down, q/o, k/v; the absmax of gate/up/down (3.5 MiB → 4) and q/o (k/v's stay on the GPU)
    assert host_layer_bytes(c70, "nf4") == 3 * 2**27 + 2 * 2**25 + 2 * 2**22 + 3 * 2**22 + 2 * 2**20


def test_plan_marks_options_the_host_cannot_pin(tmp_path, capsys):
    """70B at 1 × 65,536 tokens on a 141 GB card: streamed with offloaded checkpoints needs 80 GiB of
    layer inputs in host memory beside the weights; with 64 GiB of host that row does not fit, and
    the plan falls back to the checkpoints on the GPU."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(tmp_path / "70b")
    args = ["plan", "--model", str(tmp_path / "70b"), "--lora-r", "64", "--batch-size", "1", "--max-seq-len", "65536",
            "--gpu-memory", "139GiB"]
    assert main([*args, "--host-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "host 64.0 GiB" in out
    rows = {(r[1], r[2]): r for r in (line.split() for line in out.splitlines() if line.strip().startswith("1 "))}
    assert rows[("offload", "streamed")][-2:] == ["no", "(host)"]
    assert float(rows[("offload", "streamed")][-3]) == pytest.approx(80 * 65536 * 8192 * 2 / 2**30 + 80 * 0.459, abs=0.1)
    assert rows[("checkpoint", "streamed")][-1] == "yes"
    assert "fastest that fits: --batch-size 1 --grad-accum 1 --gradient-checkpointing --stream-weights on" in out
    assert main([*args, "--host-memory", "256GiB"]) == 0
    out = capsys.readouterr().out
    assert "--offload-checkpoints" in out.splitlines()[-1]  # resident weights, inputs offloaded: fits then
    assert main([*args, "--host-memory", "30GiB"]) == 0  # 36.7 GiB of streamed weights alone: nothing fits
    assert capsys.readouterr().out.splitlines()[-1] == (
        "nothing fits: what fits the GPU needs at least 36.7 GiB of pinned host memory, more than 90% of the "
        "30.0 GiB host; use a shorter data.max_seq_len, a bigger GPU or more host memory")
    assert main([*args, "--host-memory", "lots"]) == 2
    assert "--host-memory 'lots': give a size such as 24GiB" in capsys.readouterr().err
