"""`qfine export --format gguf-lora`: the adapter alone, applied by llama.cpp (`--lora`) to the base
the run trained on, answers as the merged GGUF does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import FACT, tiny_config, write_jsonl
from llamacpp import needs_llamacpp, run
from qfine.cli import main
from qfine.training import train


@pytest.fixture(scope="module")
def taught_run(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model after 60 steps on the fact (it answers it greedily)."""
    tmp = tmp_path_factory.mktemp("lora-gguf")
    data = write_jsonl(tmp / "fact.jsonl", [{"messages": FACT}] * 16)
    cfg = tiny_config(tiny_dir, data, tmp / "run", max_steps=60, save_steps=60, report_samples=0)
    cfg.lora.r, cfg.lora.alpha = 8, 32  # alpha/r = 4: the file's alpha must carry the scaling, not r
    return train(cfg)


def _prompt(run_dir: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    return tok.apply_chat_template([FACT[0]], add_generation_prompt=True, tokenize=False)


@needs_llamacpp
def test_the_adapter_on_its_base_answers_as_the_merged_file(taught_run, tmp_path, capsys):
    from gguf import GGUFReader

    lora, base, merged = tmp_path / "fact-lora.gguf", tmp_path / "base.gguf", tmp_path / "merged.gguf"
    assert main(["export", str(taught_run), "--format", "gguf-lora", "--out", str(lora), "--base-out", str(base),
                 "--quant", "f16"]) == 0
    assert main(["export", str(taught_run), "--quant", "f16", "--out", str(merged), "--no-check"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA GGUF: 14 adapted linears, r=8, alpha 32" in printed, printed
    fields = GGUFReader(str(lora)).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert lora.stat().st_size < merged.stat().st_size / 20
    prompt = {"prompt": _prompt(taught_run), "max_tokens": 16}
    with_lora = run(base, generate=[prompt], lora=lora)
    from_merged = run(merged, generate=[prompt])
    base_alone = run(base, generate=[prompt])
    # on CPUs with AMX llama.cpp keeps the adapter's tensors in plain CPU memory and says so; nothing else
    warned = [w for w in with_lora["warnings"] if not w.endswith("fallback to CPU")]
    assert not warned, warned
    print(f"\n[gguf-lora] base+lora: {with_lora['generated']!r}; merged: {from_merged['generated']!r}; "
          f"base alone: {base_alone['generated']!r}")
    assert with_lora["generated"] == from_merged["generated"]
    assert with_lora["generated"][0].startswith(FACT[1]["content"][:20])  # the taught answer
    assert base_alone["generated"] != with_lora["generated"]  # the adapter is what answers


def test_what_a_lora_pair_cannot_carry_is_refused(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "fact.jsonl", [{"messages": FACT}] * 4)
    cfg = tiny_config(tiny_dir, data, tmp_path / "dora", max_steps=1, save_steps=1, report_samples=0)
    cfg.lora.variant = "dora"
    run_dir = train(cfg)
    assert main(["export", str(run_dir), "--format", "gguf-lora", "--out", str(tmp_path / "d.gguf")]) == 2
    assert "DoRA's per-row magnitudes are not a LoRA pair" in capsys.readouterr().err
    assert not (tmp_path / "d.gguf").exists()
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["use_dora"]
