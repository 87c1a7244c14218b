"""bench/prequantized.py (the writer of pre-quantized NF4 folders for the 70B-shaped benchmarks): the
folder it writes tensor by tensor holds the same bytes as transformers' own 4-bit save of the same
weights, and qfine loads and trains it as it is."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from prequantized import write_nf4_folder  # noqa: E402

from qfine import ModelConfig, load_model  # noqa: E402
from qfine.quant.bnb4 import guard_cpu_repack


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def test_written_folder_equals_transformers_4bit_save_and_loads(tmp_path, save_tiny):
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    src = save_tiny(tmp_path / "bf16")
    ref_model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.bfloat16, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    guard_cpu_repack(ref_model)  # no in-place repack at the first no-grad forward (see qfine.models.loading)
    ref_model.save_pretrained(tmp_path / "ref")
    weights = _tensors(Path(src))
    made = []

    def make(name, shape):
        made.append(name)
        assert tuple(weights[name].shape) == shape
        return weights[name].to(torch.bfloat16)

    out = tmp_path / "pre"
    info = write_nf4_folder(AutoConfig.from_pretrained(src), out, make, shard_bytes=20_000)  # several shards
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    for f in Path(src).glob("tokenizer*"):  # the bench writes its own tokenizer next to the weights
        (out / f.name).write_bytes(f.read_bytes())
    got, ref = _tensors(out), _tensors(tmp_path / "ref")
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert info["params"] == sum(weights[n].numel() for n in made)
    assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in got)

    loaded = load_model(ModelConfig(source=str(out), quantization="nf4", compute_dtype="bf16", device="cpu")).model
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        a, b = loaded(input_ids=ids).logits, ref_model(input_ids=ids).logits
    assert torch.equal(a, b)
    import bitsandbytes as bnb

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules()) == 7 * loaded.config.num_hidden_layers
