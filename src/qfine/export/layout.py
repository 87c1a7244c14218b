"""How a transformers causal LM is laid out in GGUF: architecture metadata, tensor names and the
per-family rewrites llama.cpp expects, the tokenizer, and which tensor gets which type in a mix.

Families (``model_type`` → GGUF ``general.architecture``):

* ``llama``, ``mistral`` → ``llama``: q/k rows permuted from transformers' rotate-half RoPE layout
  to GGML's interleaved one (what llama.cpp's converter does, and transformers' GGUF reader undoes);
* ``qwen2`` → ``qwen2``: no permutation; q/k/v biases kept;
* ``gemma`` → ``gemma``: RMSNorm weights stored as ``1 + w`` (GGML multiplies by the stored value),
  head size written explicitly, embeddings always tied.

RoPE: plain, or Llama 3's frequency-dependent scaling (``rope_type: llama3``, Llama 3.1/3.2), which
GGUF carries as a ``rope_freqs.weight`` tensor of per-frequency divisors (:func:`rope_factors`).
Anything else is refused by name (:func:`arch_of`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from qfine.util.errors import QfineError


@dataclass(frozen=True)
class Arch:
    name: str             # GGUF general.architecture
    permute_qk: bool      # rotate-half → interleaved RoPE rows for q/k
    norm_plus_one: bool   # store RMSNorm scales as 1 + w


ARCHS = {"llama": Arch("llama", True, False), "mistral": Arch("llama", True, False),
         "qwen2": Arch("qwen2", False, False), "gemma": Arch("gemma", False, True)}

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def arch_of(config) -> Arch:
    """The GGUF architecture of a transformers config; other families are a QfineError naming them."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise QfineError(f"GGUF export knows the {', '.join(sorted(ARCHS))} families, not model_type {kind!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind_of_rope = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind_of_rope not in ("default", None) and not (kind_of_rope == "llama3" and ARCHS[kind].name == "llama"):
        raise QfineError(f"GGUF export writes plain RoPE and Llama 3's scaled RoPE; this model uses rope_type "
                         f"{kind_of_rope!r}")
    return ARCHS[kind]


def _rope_dict(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope if isinstance(rope, dict) else {}


def rope_factors(config) -> np.ndarray | None:
    """For ``rope_type: llama3``, the (head_dim / 2,) fp32 divisors of RoPE's default inverse
    frequencies that give Llama 3's scaled ones (GGUF ``rope_freqs.weight``; llama.cpp divides each
    angle by its factor): 1 above the high-frequency cut, ``factor`` below the low-frequency one, and
    a smooth blend between, with the wavelength cuts at ``original_max_position_embeddings`` divided
    by ``high_freq_factor`` / ``low_freq_factor``. None for plain RoPE."""
    rope = _rope_dict(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    theta = getattr(config, "rope_theta", None) or rope.get("rope_theta") or 10000.0
    dim = _head_dim(config)
    inv = 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    blend = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blend))
    return out.astype(np.float32)


def gguf_name(key: str) -> str | None:
    """The GGUF tensor name of a transformers state-dict key (None: a key GGUF has no place for)."""
    m = _KEY.match(key)
    if m:
        part = _LAYER.get(m.group(2))
        return f"blk.{m.group(1)}.{part}.{m.group(3)}" if part else None
    stem, _, kind = key.rpartition(".")
    top = _TOP.get(stem)
    return f"{top}.{kind}" if top else None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection (n_head·head_dim, ...) from rotate-half to interleaved RoPE pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(arch: Arch, config, name: str, x: np.ndarray) -> np.ndarray:
    """The GGUF form of tensor ``name`` (already renamed) from its transformers value ``x`` (fp32)."""
    if arch.permute_qk and name.endswith(("attn_q.weight", "attn_q.bias")):
        return permute_rows(x, config.num_attention_heads)
    if arch.permute_qk and name.endswith(("attn_k.weight", "attn_k.bias")):
        return permute_rows(x, config.num_key_value_heads)
    if arch.norm_plus_one and name.endswith("norm.weight"):
        return x + 1.0
    return x


def model_fields(arch: Arch, config) -> dict[str, object]:
    """``{arch}.*`` metadata (GGUF key suffix → value) of the config."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = getattr(config, "rope_theta", None) or (rope.get("rope_theta") if isinstance(rope, dict) else None)
    fields = {
        "context_length": int(config.max_position_embeddings),
        "embedding_length": int(config.hidden_size),
        "block_count": int(config.num_hidden_layers),
        "feed_forward_length": int(config.intermediate_size),
        "attention.head_count": int(config.num_attention_heads),
        "attention.head_count_kv": int(getattr(config, "num_key_value_heads", config.num_attention_heads)),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "rope.freq_base": float(theta or 10000.0),
        "rope.dimension_count": int(_head_dim(config)),
        "vocab_size": int(config.vocab_size),
    }
    if arch.name == "gemma":
        fields["attention.key_length"] = fields["attention.value_length"] = int(_head_dim(config))
    return fields


# --- which tensor gets which type ----------------------------------------------------------------

# the file types a user asks for → (llama.cpp's file-type number, the base type of 2-D tensors)
FILE_TYPES = {"f16": (1, "F16"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0"), "q4_0": (2, "Q4_0"),
              "q4_1": (3, "Q4_1"), "q4_k_m": (15, "Q4_K"), "q5_k_m": (17, "Q5_K"), "q6_k": (18, "Q6_K")}
# a K-quant whose rows are not whole 256-value super-blocks: llama.cpp's fallbacks
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}


def more_bits(layer: int, n_layers: int) -> bool:
    """The layers llama.cpp's _M mixes give more bits (attn_v, ffn_down): the first and last eighth
    and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(quant: str, name: str, shape: tuple[int, ...], n_layers: int, has_output: bool) -> str:
    """The GGML type of tensor ``name`` (numpy shape) in a file of type ``quant``."""
    if len(shape) < 2:
        return "F32"  # norms and biases stay exact
    base = FILE_TYPES[quant][1]
    head = name == "output.weight" or (not has_output and name == "token_embd.weight")
    if quant not in ("f16", "bf16", "q8_0"):
        if head:
            base = "Q6_K"  # the output projection decides every token: llama.cpp keeps it at 6 bits
        elif quant in ("q4_k_m", "q5_k_m") and name.endswith(("attn_v.weight", "ffn_down.weight")):
            m = re.match(r"blk\.(\d+)\.", name)
            if m and more_bits(int(m.group(1)), n_layers):
                base = "Q6_K"
    cols = shape[-1]
    if base in _FALLBACK and cols % 256:
        base = _FALLBACK[base]
    if base in _BLOCK and cols % _BLOCK[base]:
        base = "F16"
    return base
