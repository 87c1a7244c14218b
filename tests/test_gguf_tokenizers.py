"""GGUF export's tokenizer, checked by llama.cpp itself: for each byte-level BPE family qfine exports
(Llama 3, Qwen2, SmolLM, GPT-2) a tiny model with a tokenizer of that family's configuration is
built in code, exported, and llama.cpp's token ids must equal transformers' on every test string."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamacpp import needs_llamacpp, run
from qfine.cli import main
from qfine.export import pretok, verify

CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'm sure you'll see we've done it, they'd said.",
    "def main(argv):\n    return {'a': [1, 2, 3], \"b\": None}  # comment\n\tif x >= 10: print(x)\n",
    "Numbers: 3 33 333 3333 12345 3.14 1,000,000 and dates like 2026-12-03 or 10:45.",
    "Café, naïve, résumé, Zürich, Ångström; ¿Qué tal? — “quoted” and ‘single’ quotes…",
    "<html><body class=\"x\">Hello &amp; welcome</body></html>   spaces    and\n\n\nnewlines",
    "Users ask: What's the capital of France? The assistant answers: Paris is the capital.",
] * 20

STRINGS = verify.STRINGS  # contractions, digits, whitespace runs, accents, CJK, emoji, code

FAMILIES = {
    # name: (llama.cpp name, transformers model class, specials, chat special used in a test string)
    "llama3": ("llama-bpe", "llama", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                     "<|end_header_id|>"]),
    "qwen2": ("qwen2", "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "smollm": ("smollm", "llama", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "gpt2": ("gpt-2", "llama", ["<|endoftext|>"]),
}


def _tokenizer(family: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = FAMILIES[family][2]
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family in ("llama3", "qwen2"):
        pattern = pretok._LLAMA3 if family == "llama3" else pretok._QWEN2
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if family == "qwen2":
            tok.normalizer = normalizers.NFC()
    elif family == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    eos = specials[2] if family == "llama3" else specials[-1] if family != "gpt2" else specials[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=eos, pad_token=eos)


def _model(family: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = _tokenizer(family)
    kind = FAMILIES[family][1]
    cls = Qwen2Config if kind == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_named_as_llama_cpp_names_it(family, tmp_path):
    tok = _tokenizer(family)
    assert pretok.by_structure(tok) == FAMILIES[family][0]
    assert pretok.identify(tok) == FAMILIES[family][0]


def test_an_unknown_pre_tokenizer_is_refused_by_name(tmp_path, capsys):
    from tokenizers import pre_tokenizers

    folder = _model("gpt2", tmp_path / "odd")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = json.loads(pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]).__getstate__())
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    assert main(["export", str(folder), "--quant", "f16", "--out", str(tmp_path / "odd.gguf"), "--no-check"]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp has no pre-tokenizer name for this tokenizer" in err and "Whitespace" in err
    assert not (tmp_path / "odd.gguf").exists()


@needs_llamacpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_tokenizes_like_transformers(family, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    folder = _model(family, tmp_path / family)
    out = tmp_path / f"{family}.gguf"
    assert main(["export", str(folder), "--quant", "f16", "--out", str(out), "--no-check"]) == 0
    pre = GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents()
    assert pre == FAMILIES[family][0]
    tok = AutoTokenizer.from_pretrained(folder)
    specials = FAMILIES[family][2]
    texts = STRINGS + [f"{specials[-1]}user\nHi there{specials[0]}", f"a{specials[-1]}b"]
    assert len(texts) >= 30
    got = run(out, tokenize=texts)
    assert not [w for w in got["warnings"] if "pre-tokenizer" in w or "GENERATION QUALITY" in w], got["warnings"]
    wrong = [(t, ids, tok.encode(t, add_special_tokens=False)) for t, ids in zip(texts, got["tokens"])
             if ids != tok.encode(t, add_special_tokens=False)]
    assert not wrong, wrong[:3]
