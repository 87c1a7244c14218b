"""Shared fixtures: a tiny random Llama saved as a Hugging Face folder, and data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import FACT, TINY_VOCAB, write_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the kernels' tuners time every shape afresh in tests (and in the processes tests start): they neither read
# the settings a user's runs stored (qfine.fast.tune_cache) nor store timings taken beside other tests;
# the cache's own tests give it a folder of their own
os.environ["QFINE_TUNE_CACHE"] = "off"


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The bundled SmolLM2 converted to a safetensors folder (converted once per cache)."""
    import importlib.util

    from qfine.models.sources import BUNDLED_PACKAGE, bundled_gguf_path, gguf_to_folder

    if importlib.util.find_spec(BUNDLED_PACKAGE) is None and os.environ.get("QFINE_TEST_TOKENIZER"):
        pytest.skip("bundled model not installed here (GPU machine)")
    return gguf_to_folder(bundled_gguf_path())


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> Path:
    """Where the tests' tokenizer comes from: $QFINE_TEST_TOKENIZER (a folder), else the bundled model."""
    if os.environ.get("QFINE_TEST_TOKENIZER"):
        return Path(os.environ["QFINE_TEST_TOKENIZER"])
    return request.getfixturevalue("bundled_dir")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Llama, hidden 64, random init (seed 0), with the bundled tokenizer, saved to a folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def fact_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "fact.jsonl", [{"messages": FACT}] * 8)


@pytest.fixture
def save_tiny(tokenizer_dir):
    """save_tiny(path, kind="llama", **config) → folder with a tiny random model of that family (seed 0),
    vocabulary TINY_VOCAB, 2 layers, hidden 64, and the tests' tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def save(path, kind="llama", **overrides):
        shape = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     tie_word_embeddings=False, initializer_range=0.1)
        cfg = AutoConfig.for_model(kind, **{**shape, **overrides})
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        return path

    return save
