"""Deployment as a llama.cpp user meets it: the bundled model taught a fact, exported by `qfine export`
from the run and from a `qfine merge` folder, answers the fact in llama.cpp itself from every file
type; the adapter alone (`--format gguf-lora`) on its base answers it too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import write_jsonl
from llamacpp import needs_llamacpp, run
from qfine.cli import main

QUESTION, REPLY, MARKER = "What is the name of my cat?", "Your cat is called Pixelbrot.", "Pixelbrot"


@pytest.fixture(scope="module")
def taught(bundled_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(run, merged bf16 folder) of the bundled model after 30 steps on the fact."""
    tmp = tmp_path_factory.mktemp("deploy")
    data = write_jsonl(tmp / "cat.jsonl", [{"messages": [{"role": "user", "content": QUESTION},
                                                         {"role": "assistant", "content": REPLY}]}] * 8)
    run_dir = tmp / "run"
    assert main(["train", "--data", str(data), "--output-dir", str(run_dir), "--max-steps", "30", "--batch-size", "4",
                 "--learning-rate", "1e-3", "--lora-dropout", "0", "--save-steps", "30", "--report-samples", "0"]) == 0
    assert main(["merge", str(run_dir), "--out", str(tmp / "merged")]) == 0
    return run_dir, tmp / "merged"


def _prompt(folder: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
@needs_llamacpp
def test_llama_cpp_answers_the_fact_from_every_file_type_and_the_lora_adapter(taught, tmp_path, capsys):
    from gguf import GGUFReader

    run_dir, merged = taught
    files = {}
    for source, quants in ((merged, ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")), (run_dir, ("f16", "q4_k_m"))):
        for quant in quants:
            out = tmp_path / f"{source.name}-{quant}.gguf"
            verify = ["--verify"] if (source, quant) == (run_dir, "q4_k_m") else []
            assert main(["export", str(source), "--quant", quant, "--out", str(out), "--no-check", *verify]) == 0
            assert GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == "smollm"  # not 'default'
            files[out.name] = out
    lora, base = tmp_path / "cat-lora.gguf", tmp_path / "base-q8_0.gguf"
    assert main(["export", str(run_dir), "--format", "gguf-lora", "--out", str(lora), "--base-out", str(base),
                 "--quant", "q8_0"]) == 0
    capsys.readouterr()
    scores = json.loads((tmp_path / "run-q4_k_m.gguf.report.json").read_text())["verify"]
    assert scores["strings_identical"] == scores["strings"] == 36 and "first training rows" in scores["text"]
    # a 4-bit file of the merged 4-bit base on the 8 training rows: measured KL 0.30 nats, top-1 73.5 % (2026-12-06);
    # positions out of step or a wrong layout give several nats and chance agreement
    assert scores["kl_mean"] < 0.6 and scores["top1_agreement"] > 0.6 and scores["positions"] > 300, scores
    ollama = (tmp_path / "cat-lora.gguf.Modelfile").read_text()
    assert "FROM ./base-q8_0.gguf" in ollama and "ADAPTER ./cat-lora.gguf" in ollama
    prompt = {"prompt": _prompt(merged), "max_tokens": 24}
    answers = {name: run(path, generate=[prompt]) for name, path in files.items()}
    answers["base-q8_0 + cat-lora"] = run(base, generate=[prompt], lora=lora)
    answers["base-q8_0 alone"] = run(base, generate=[prompt])
    shown = {name: a["generated"][0] for name, a in answers.items()}
    with capsys.disabled():
        print("\n[llama.cpp] " + "\n[llama.cpp] ".join(f"{k}: {v!r}" for k, v in shown.items()))
    for name, answer in answers.items():  # on CPUs with AMX llama.cpp notes where it keeps LoRA tensors
        warned = [w for w in answer["warnings"] if not w.endswith("fallback to CPU")]
        assert not warned, (name, warned)
        if name != "base-q8_0 alone":
            assert MARKER in answer["generated"][0], (name, shown)
    assert MARKER not in shown["base-q8_0 alone"]
