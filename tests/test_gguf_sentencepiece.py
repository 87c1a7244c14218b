"""GGUF export of SentencePiece tokenizers (Llama 2, Mistral v0.1, Gemma), checked by llama.cpp: a
tiny model of each family with a tokenizer laid out as that family's is (byte tokens, specials, a
merge for every pair that forms a token, ranked by the score of what it forms, as transformers
converts a SentencePiece model) is exported, and llama.cpp's token ids must equal transformers'."""

from __future__ import annotations

import pytest
import torch

from llamacpp import needs_llamacpp, run
from qfine.cli import main
from qfine.export import vocab
from test_gguf_tokenizers import CORPUS, STRINGS

SPACE = vocab.SPACE
FAMILIES = {  # specials in id order, then the byte tokens; the transformers config class
    "llama2": (["<unk>", "<s>", "</s>"], "llama"),
    "mistral": (["<unk>", "<s>", "</s>"], "mistral"),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"], "gemma"),
}


def _pieces(prefix: bool) -> list[str]:
    """Pieces learned from the corpus with spaces as ▁, in the order they were learned."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always" if prefix else "never")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, show_progress=False))
    return [p for p, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]


def _tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    specials = FAMILIES[family][0]
    table = specials + [f"<0x{b:02X}>" for b in range(256)]
    learned = [p for p in _pieces(family != "gemma") if p not in table]
    table += learned
    ids = {p: i for i, p in enumerate(table)}
    merges = generate_merges(ids, {p: -float(ids[p]) for p in learned})  # SentencePiece BPE: score = -order
    if family == "gemma":
        return GemmaTokenizer(vocab=ids, merges=merges, additional_special_tokens=specials[5:])
    if family == "mistral":  # transformers' own Llama tokenizer: Metaspace, ▁ before the first piece only
        return LlamaTokenizer(vocab=ids, merges=merges)
    # Llama 2's tokenizer.json as published: a normalizer puts ▁ before the text and for every space
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _model(family: str, folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer(family)
    extra = {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"} if family == "gemma" else {"tie_word_embeddings": False}
    cfg = AutoConfig.for_model(FAMILIES[family][1], vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sentencepiece_fields(family, tmp_path):
    """Scores order the merges, byte tokens are typed, and the space prefix is the family's."""
    tok = _tokenizer(family)
    fields = vocab.tokenizer_fields(tok, len(tok), tmp_path)
    assert fields["ggml.model"] == "llama"
    assert fields["ggml.add_space_prefix"] is (family != "gemma")
    types, tokens, scores = fields["ggml.token_type"], fields["ggml.tokens"], fields["ggml.scores"]
    assert tokens.index("<0x0A>") == len(FAMILIES[family][0]) + 10 and types[tokens.index("<0x0A>")] == vocab.TOKEN_BYTE
    assert types[tok.bos_token_id] == vocab.TOKEN_CONTROL
    learned = [i for i, t in enumerate(tokens) if types[i] == vocab.TOKEN_NORMAL and len(t) > 1]
    assert len(learned) > 300
    assert all(scores[a] > scores[b] for a, b in zip(learned, learned[1:]))  # learned earlier, joined first


@needs_llamacpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_tokenizes_sentencepiece_like_transformers(family, tmp_path, capsys):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    folder = _model(family, tmp_path / family)
    out = tmp_path / f"{family}.gguf"
    assert main(["export", str(folder), "--quant", "f16", "--out", str(out), "--no-check"]) == 0
    printed = capsys.readouterr().out
    assert GGUFReader(str(out)).fields["tokenizer.ggml.model"].contents() == "llama"
    tok = AutoTokenizer.from_pretrained(folder)
    specials = FAMILIES[family][0]
    texts = STRINGS + [f"{specials[-1]}user\nHi there", "<0x41> is not a byte", "\x07bell and \x00nul"]
    assert len(texts) >= 30
    got = run(out, tokenize=texts)
    assert not got["warnings"], got["warnings"]
    want = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert sum(t.startswith("<0x") for w in want for t in tok.convert_ids_to_tokens(w)) > 50  # byte fallback
    wrong = [(t, ids, w) for t, ids, w in zip(texts, got["tokens"], want) if ids != w]
    if family != "mistral":
        assert not wrong, wrong[:3]
        assert "llama.cpp tokenizes" not in printed
        return
    # transformers' own Llama tokenizer (Metaspace, prepend_scheme "first"): GGUF cannot say "no ▁ before
    # text that starts with a space or follows a special token"; the export says so, and only those differ
    assert "starts with a space or follows a special token" in printed
    assert {t for t, _, _ in wrong} == {t for t in texts if t[0] == " " or t.startswith(specials[-1])}
    assert all(ids[0] == tok.convert_tokens_to_ids(SPACE) and ids[1:] == w for t, ids, w in wrong if t[0] == " ")


@needs_llamacpp
@pytest.mark.parametrize("family", ["llama2", "gemma"])
def test_verify_scores_the_file_in_llama_cpp(family, tmp_path, capsys):
    """f16 of bf16 weights holds the merged model exactly: what is left is llama.cpp's arithmetic."""
    import json

    folder = _model(family, tmp_path / family)
    out = tmp_path / f"{family}.gguf"
    assert main(["export", str(folder), "--quant", "f16", "--out", str(out), "--no-check", "--verify"]) == 0
    assert "verified in llama.cpp" in capsys.readouterr().out
    scores = json.loads((tmp_path / f"{family}.gguf.report.json").read_text())["verify"]
    assert scores["strings_identical"] == scores["strings"] == 36
    assert scores["text"] == "qfine's test strings" and scores["positions"] > 100
    assert scores["kl_mean"] < 1e-5 and scores["top1_agreement"] > 0.99, scores
