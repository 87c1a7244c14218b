"""The tokenizer of a GGUF file (``tokenizer.*`` metadata), in the two kinds llama.cpp reads.

* **Byte-level BPE** (``tokenizer.ggml.model = gpt2``: Llama 3, Qwen2, SmolLM, GPT-2): tokens in id
  order, the merges, and the pre-tokenizer's name (:mod:`.pretok`), which selects the regular
  expressions llama.cpp splits words with.
* **SentencePiece BPE with byte fallback** (``llama``: Llama 2, Mistral v0.1, Gemma): tokens with
  ``▁`` for spaces, a score per token, token types (``<0xNN>`` byte tokens are what text without a
  token falls back to), and whether a space is put before the text (``add_space_prefix``).
  llama.cpp's tokenizer for this kind repeatedly joins the adjacent pair whose joined text is a token
  of the highest score (the leftmost on a tie); transformers' BPE joins the pair of the lowest merge
  rank. A tokenizer converted from SentencePiece lists a merge for every pair that forms a token,
  ranked by the score of what it forms, so scores taken from the merge ranks (the first merge that
  forms a token gives its score, ``-rank``) make llama.cpp join in transformers' order. Only
  tokenizer.json is needed: a merged folder has no ``tokenizer.model``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qfine.export import pretok
from qfine.models.sources import source_gguf
from qfine.util.errors import QfineError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space
_BYTE = re.compile(r"^<0x[0-9A-F]{2}>$")


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise QfineError("GGUF export needs a fast (tokenizer.json) tokenizer")
    return json.loads(backend.to_str())


def tokenizer_fields(tokenizer, vocab_size: int, source: str | Path) -> dict[str, object]:
    """``tokenizer.*`` metadata (key suffix → value) of ``tokenizer`` for a model of ``vocab_size``
    rows (the token list is padded to it with unused entries); ``source`` is where the model came
    from (a folder converted from GGUF keeps that file's pre-tokenizer name). Other tokenizer kinds
    (WordPiece, Unigram) are a QfineError naming the kind."""
    spec = _spec(tokenizer)
    model = spec.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        fields = _sentencepiece_fields(tokenizer, spec, vocab_size)
    elif model.get("type") == "BPE":
        fields = _byte_level_fields(tokenizer, spec, vocab_size, pre_tokenizer_name(source, tokenizer))
    else:
        raise QfineError(f"GGUF export writes byte-level BPE and SentencePiece BPE tokenizers; this one is a "
                         f"{model.get('type')} model")
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            fields[f"ggml.{key}_token_id"] = int(value)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        fields["chat_template"] = tokenizer.chat_template
    return fields


def _slots(tokenizer, vocab_size: int) -> tuple[list[str], list[int], int]:
    vocab = tokenizer.get_vocab()
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_UNUSED] * n
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, TOKEN_NORMAL
    return tokens, types, n


def _byte_level_fields(tokenizer, spec: dict, vocab_size: int, pre: str) -> dict[str, object]:
    tokens, types, _ = _slots(tokenizer, vocab_size)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {"ggml.model": "gpt2", "ggml.pre": pre, "ggml.tokens": tokens, "ggml.token_type": types,
            "ggml.merges": merges, "ggml.add_bos_token": bool(getattr(tokenizer, "add_bos_token", False))}


def space_prefix(spec: dict) -> tuple[bool, str]:
    """Whether the tokenizer puts ``▁`` before the text (Llama 2, Mistral: yes; Gemma: no), from its
    normalizer (``Prepend``) or pre-tokenizer (``Metaspace`` with a prepend scheme), and where
    llama.cpp will tokenize differently ("" where it will not). llama.cpp puts a space before every
    piece of text that starts the input or follows a special token, as SentencePiece and a
    ``Prepend`` normalizer do; GGUF has no key for transformers' ``Metaspace``, which skips text that
    already starts with a space and, with ``prepend_scheme: first``, text after a special token. A
    pipeline that does something llama.cpp's SentencePiece tokenizer does not (lower-casing,
    splitting into words) is a QfineError naming the step."""
    steps = []
    note = ""
    for part in ("normalizer", "pre_tokenizer"):
        node = spec.get(part)
        steps += (node.get("normalizers") or node.get("pretokenizers") or [node]) if node else []
    prefix = False
    for step in steps:
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == SPACE:
            prefix = True
        elif kind == "Replace" and step.get("pattern", {}).get("String") == " " and step.get("content") == SPACE:
            continue
        elif kind == "Metaspace" and step.get("replacement") == SPACE and not step.get("split", False):
            scheme = step.get("prepend_scheme", "always")
            prefix = prefix or scheme != "never"
            if scheme != "never":
                note = ("llama.cpp tokenizes text that starts with a space"
                        + (" or follows a special token" if scheme == "first" else "")
                        + " with one more '▁' than this tokenizer (transformers' Metaspace, prepend_scheme "
                        + f"{scheme!r}: GGUF cannot say it)")
        elif kind == "Split" and step.get("pattern", {}).get("String") == " ":
            continue  # Gemma's: it runs after spaces became ▁, so it never splits
        else:
            raise QfineError(f"GGUF export cannot reproduce this SentencePiece tokenizer's {kind} step in llama.cpp "
                             f"({json.dumps(step)[:120]})")
    return prefix, note


def _sentencepiece_fields(tokenizer, spec: dict, vocab_size: int) -> dict[str, object]:
    prefix, _ = space_prefix(spec)
    tokens, types, n = _slots(tokenizer, vocab_size)
    vocab = tokenizer.get_vocab()
    scores = [0.0] * n
    ranked = set()
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        if i is not None and i not in ranked:  # the first merge that forms a token orders it
            scores[i] = -float(rank)
            ranked.add(i)
    for tok, i in vocab.items():
        if _BYTE.match(tok):
            types[i] = TOKEN_BYTE
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = TOKEN_UNKNOWN
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if added.get("special"):
            types[i] = TOKEN_CONTROL
        else:  # llama.cpp matches user-defined tokens in the text before it turns spaces into ▁
            types[i], tokens[i] = TOKEN_USER_DEFINED, added["content"].replace(SPACE, " ")
        scores[i] = -1000.0
    return {"ggml.model": "llama", "ggml.pre": "default", "ggml.tokens": tokens, "ggml.scores": scores,
            "ggml.token_type": types, "ggml.add_space_prefix": prefix,
            "ggml.add_bos_token": bool(getattr(tokenizer, "add_bos_token", True)),
            "ggml.add_eos_token": bool(getattr(tokenizer, "add_eos_token", False))}


def divergence(tokenizer) -> str:
    """Where llama.cpp will tokenize text differently from ``tokenizer`` although the GGUF file says
    all it can ("" for none known): see :func:`space_prefix`."""
    spec = _spec(tokenizer)
    model = spec.get("model", {})
    return space_prefix(spec)[1] if model.get("type") == "BPE" and model.get("byte_fallback") else ""


def pre_tokenizer_name(source: str | Path, tokenizer) -> str:
    """llama.cpp's name for a byte-level BPE model's pre-tokenizer: the one its original GGUF carried
    when the model was converted from one, else the one :func:`qfine.export.pretok.identify` finds
    (or refuses)."""

    original = source_gguf(source) if Path(str(source)).is_dir() else None
    if original is not None:
        from gguf import GGUFReader

        field = GGUFReader(str(original)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return pretok.identify(tokenizer)
