"""GGUF export: K-quant bytes against the gguf package's reference dequantizer, and whole files from
tiny Llama, Qwen2 and Gemma runs (dimensions multiples of 256, so every block type runs) read back
by independent readers — transformers' GGUF loader and ``gguf.GGUFReader`` + ``gguf.quants``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import FACT, tiny_config, write_jsonl
from qfine.cli import main
from qfine.export.gguf_file import decode, encode
from qfine.export.kquants import QUANTIZERS
from qfine.util.errors import QfineError


def _values(rows=32, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[1, 3] = 0.9                  # an outlier
    x[2] = 0.0                     # an all-zero row
    x[3] = np.abs(x[3]) + 0.01     # a row with no negative value
    x[4, :256] = 1e-9              # a block of tiny values (fp16 subnormal scales)
    return x


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_k_quant_bytes_decode_to_the_values(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    x = _values()
    data = QUANTIZERS[kind](x)
    per_block = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[kind]
    assert data.shape == (32, 512 // 256 * per_block) and data.dtype == np.uint8
    y = dequantize(data, GGMLQuantizationType[kind.upper()])  # the gguf package's reference reader
    rel = float(np.linalg.norm(y - x) / np.linalg.norm(x))
    assert rel < {"q4_k": 0.08, "q5_k": 0.04, "q6_k": 0.022}[kind], rel  # measured 0.077, 0.037, 0.021
    assert np.array_equal(y[2], np.zeros(512))  # zeros stay zero
    tiny = np.abs(y[4, :256] - x[4, :256]).max()
    assert tiny <= 1e-9  # a block of tiny values is not blown up by its fp16 scales


def _llama_cpp_quantizers(tmp_path):
    """llama.cpp's reference K-quant encoders, compiled from the source node-llama-cpp ships."""
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import kquant_error

    if shutil.which("gcc") is None or not kquant_error.BUNDLE.is_file():
        pytest.skip("gcc or llama.cpp's source (tools/llamacpp, installed by make test) is missing")
    return kquant_error, kquant_error.build_reference(tmp_path)


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_k_quant_error_is_llama_cpps_within_two_percent(kind, tmp_path):
    """On heavy-tailed weights (Student-t, as trained weights are), the relative RMS error of qfine's
    encoding is at most llama.cpp's own + 2 %."""
    bench, lib = _llama_cpp_quantizers(tmp_path)
    rng = np.random.default_rng(0)
    x = (0.02 * rng.standard_t(5, size=(64, 1024))).astype(np.float32)
    ours = bench.rel_error(kind, QUANTIZERS[kind](x), x)
    ref = bench.rel_error(kind, bench.llama_cpp_encode(lib, kind, x), x)
    ratio = (ours[0] / ref[0]) ** 0.5
    print(f"\n[{kind}] relative RMS error qfine {(ours[0] / ours[1]) ** 0.5:.5f}, llama.cpp "
          f"{(ref[0] / ref[1]) ** 0.5:.5f} ({100 * (ratio - 1):+.2f} %)")
    assert ratio <= 1.02


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quant_with_an_importance_matrix_is_llama_cpps_within_two_percent(kind):
    """With the same importance vector, the importance-weighted error of qfine's encoding is at most that
    of llama.cpp's own (ggml_quantize_chunk of node-llama-cpp's prebuilt libggml-base) + 2 %, and lower
    than qfine's encoding without it."""
    import ctypes

    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from llamacpp import GGML_BASE

    if not GGML_BASE.is_file():
        pytest.skip("llama.cpp (tools/llamacpp, installed by make test) is missing")
    lib = ctypes.CDLL(str(GGML_BASE))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    rng = np.random.default_rng(0)
    cols = 1024 if kind.endswith("_k") else 576  # the legacy types: rows that are no whole super-blocks
    x = (0.02 * rng.standard_t(5, size=(128, cols))).astype(np.float32)
    imp = (rng.chisquare(2, size=cols) + 0.01).astype(np.float32)
    kind_ = GGMLQuantizationType[kind.upper()]
    ours, plain = encode(x, kind.upper(), imp), encode(x, kind.upper())
    theirs = np.zeros(ours.size, dtype=np.uint8)
    lib.ggml_quantize_chunk(int(kind_), x.ctypes.data, theirs.ctypes.data, 0, x.shape[0], x.shape[1], imp.ctypes.data)

    def weighted(data):
        d = dequantize(data.reshape(x.shape[0], -1), kind_).reshape(x.shape) - x
        return float((imp * d * d).sum())

    print(f"\n[{kind} imatrix] weighted error qfine {weighted(ours):.4e}, llama.cpp {weighted(theirs):.4e}, "
          f"qfine without it {weighted(plain):.4e}")
    assert weighted(ours) <= 1.02 ** 2 * weighted(theirs)
    assert weighted(ours) < 0.97 * weighted(plain)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_quant_bytes_are_the_gguf_packages(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    x = _values(cols=256)
    assert np.array_equal(encode(x, kind), quantize(x, GGMLQuantizationType[kind]))


SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    """A short qfine run (LoRA on every projection, 4-bit base) of a tiny Llama, Qwen2 and Gemma,
    each with the tests' tokenizer (a byte-level BPE) and its full vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qfine.training import train

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("export")
    data = write_jsonl(root / "fact.jsonl", [{"messages": FACT}] * 8)
    out = {}
    for kind, extra in (("llama", {"tie_word_embeddings": False}), ("qwen2", {"tie_word_embeddings": False}),
                        ("gemma", {"head_dim": 64, "hidden_act": "gelu_pytorch_tanh"})):
        cfg = AutoConfig.for_model(kind, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPE, **extra)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / kind)
        tok.save_pretrained(root / kind)
        run_cfg = tiny_config(root / kind, data, root / f"run-{kind}", max_steps=4, report_samples=0)
        run_cfg.model.compute_dtype = "fp32"
        out[kind] = train(run_cfg)
    return out


def _merged(run):
    """The run's merged tensors by GGUF name (fp32 numpy): as transformers holds them, and in GGUF form."""
    from qfine.export import layout
    from qfine.export.merge import merged_tensors
    from qfine.generation.load import load_for_inference

    loaded = load_for_inference(str(run))
    base = loaded.model.get_base_model()
    arch = layout.arch_of(base.config)
    raw, out = {}, {}
    for key, t in merged_tensors(loaded.model, torch.float32):
        name = layout.gguf_name(key)
        if name:
            raw[name] = t.cpu().numpy()
            out[name] = layout.to_gguf(arch, base.config, name, raw[name])
    return raw, out


# one file per family in the everyday suite, the whole matrix with the slow tests (each read-back by
# transformers costs ~15 s on 2 cores)
_MATRIX = [(k, q) for k in ("llama", "qwen2", "gemma") for q in ("f16", "q8_0", "q4_k_m")]
_EVERYDAY = {("llama", "f16"), ("qwen2", "q4_k_m"), ("gemma", "q8_0")}


@pytest.mark.parametrize("kind,quant", [pytest.param(k, q, marks=() if (k, q) in _EVERYDAY else pytest.mark.slow)
                                        for k, q in _MATRIX])
def test_exported_files_read_back(runs, tmp_path, kind, quant, capsys):
    from gguf import GGUFReader

    raw, merged = _merged(runs[kind])
    out = tmp_path / f"{kind}-{quant}.gguf"
    assert main(["export", str(runs[kind]), "--quant", quant, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / f"{kind}-{quant}.gguf.report.json").read_text())
    reader = GGUFReader(str(out))
    arch = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma"}[kind]
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.block_count"].contents() == 2
    names = {t.name for t in reader.tensors}
    assert names == set(merged), names ^ set(merged)
    if kind == "qwen2":
        assert "blk.0.attn_q.bias" in names
    if kind == "gemma":
        assert "output.weight" not in names  # tied: the runtime reuses token_embd
        stored = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
        assert np.array_equal(np.asarray(stored.data), raw["blk.0.attn_norm.weight"] + 1)  # GGML scales by 1 + w
    if kind == "llama":  # q rows permuted to GGML's interleaved RoPE pairs, v rows as they were
        assert not np.array_equal(merged["blk.0.attn_q.weight"], raw["blk.0.attn_q.weight"])
        assert np.array_equal(merged["blk.0.attn_v.weight"], raw["blk.0.attn_v.weight"])
    for t in reader.tensors:  # every tensor decodes (gguf's reference) to the merged value, within its type
        kind_ = t.tensor_type.name
        got = decode(np.asarray(t.data), kind_).reshape(merged[t.name].shape)
        want = merged[t.name]
        if kind_ in ("Q4_K", "Q5_K", "Q6_K"):
            tol = {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025}[kind_]
            assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want) + 1e-12, (t.name, kind_)
        elif kind_ == "Q8_0":
            assert np.array_equal(np.asarray(t.data).reshape(-1), encode(want, "Q8_0").reshape(-1)), t.name
        else:
            tol = {"F32": 1e-7, "F16": 1e-3, "Q5_0": 0.06, "Q5_1": 0.05}[kind_]
            assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want) + 1e-12, (t.name, kind_)
    ollama = (tmp_path / f"{kind}-{quant}.gguf.Modelfile").read_text()  # Ollama's, beside the file
    assert f"FROM ./{kind}-{quant}.gguf" in ollama and 'TEMPLATE """' in ollama and "PARAMETER stop" in ollama
    types = {t["type"] for t in report["tensors"]}
    if quant == "q4_k_m":
        assert {"Q4_K", "Q6_K"} <= types  # the mix: attn_v/ffn_down and the output at 6 bits
    if kind != "gemma":  # transformers reads Llama and Qwen2 GGUF files back
        logits = list(report["logits"].values())
        assert len(logits) == 3
        # a random tiny model: measured f16 ≤ 1e-3, q8_0 ~1e-2, q4_k_m 0.20 (the bundled model: 2e-3, 5e-2, 0.28)
        assert max(logits) <= {"f16": 1e-3, "q8_0": 3e-2, "q4_k_m": 0.3}[quant], (quant, logits)
    else:
        assert "logits not read back" in report["note"] and "logits not read back" in printed


def test_importance_matrix_from_the_training_rows(runs, tmp_path, capsys):
    """q4_k_m of a run collects an importance matrix over its training rows, or over --imatrix-data; each
    quantized tensor keeps the encoding with the lower importance-weighted error, so none is worse than
    without it. A run with too few training tokens gets none, and the report says why."""
    from gguf import GGUFReader

    from qfine.export import imatrix
    from qfine.generation.load import load_for_inference

    run = runs["llama"]
    few = tmp_path / "few.gguf"
    assert main(["export", str(run), "--quant", "q4_k_m", "--out", str(few), "--no-check"]) == 0
    report = json.loads((tmp_path / "few.gguf.report.json").read_text())
    assert not report["imatrix"] and "no importance matrix: only" in report["note"] and "fewer than 1,024" in report["note"]
    words = "the a of to in is was for on with as by at from river stone light music paper garden".split()
    rng = np.random.default_rng(0)
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": " ".join(rng.choice(words, 60))} for _ in range(120)])
    out, plain = tmp_path / "imx.gguf", tmp_path / "plain.gguf"
    capsys.readouterr()
    assert main(["export", str(run), "--quant", "q4_k_m", "--out", str(out), "--no-check", "--imatrix-data",
                 str(data)]) == 0
    assert "importance matrix from" in capsys.readouterr().out
    assert main(["export", str(run), "--quant", "q4_k_m", "--out", str(plain), "--no-check", "--no-imatrix"]) == 0
    report = json.loads((tmp_path / "imx.gguf.report.json").read_text())
    assert "calib.jsonl" in report["imatrix"]
    assert not json.loads((tmp_path / "plain.gguf.report.json").read_text())["imatrix"]
    weighed = {t["name"]: t["imatrix"] for t in report["tensors"] if t["imatrix"] is not None}
    assert len(weighed) >= 10 and any(weighed.values())
    loaded = load_for_inference(str(run))
    sequences, _ = imatrix.training_sequences(str(run), loaded.tokenizer, str(data))
    importance = imatrix.collect(loaded.model, sequences)
    _, merged = _merged(run)
    files = {p: {t.name: t for t in GGUFReader(str(p)).tensors} for p in (out, plain)}
    for name in weighed:
        errs = [imatrix.weighted_error(decode(np.asarray(f[name].data), f[name].tensor_type.name), merged[name],
                                       importance[name]) for f in files.values()]
        assert errs[0] <= errs[1] * (1 + 1e-9), (name, errs)


def test_transformers_reads_the_tokenizer_back(runs, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "llama.gguf"
    assert main(["export", str(runs["llama"]), "--quant", "f16", "--out", str(out), "--no-check"]) == 0
    ours = AutoTokenizer.from_pretrained(runs["llama"] / "adapter")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = ours.apply_chat_template([{"role": "user", "content": "Héllo — what's 2+2?"}], tokenize=False,
                                    add_generation_prompt=True)
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields
    assert int(fields["tokenizer.ggml.eos_token_id"].contents()) == ours.eos_token_id
    assert int(fields["tokenizer.ggml.bos_token_id"].contents()) == ours.bos_token_id
    import transformers
    from packaging.version import Version

    assert theirs.bos_token_id == ours.bos_token_id
    if theirs.eos_token_id != ours.eos_token_id:
        # transformers 5.17's GGUF Llama tokenizer converter takes the EOS token from bos_token_id
        # (integrations/ggml.py: tokens[proto.bos_token_id]); fixed by 5.24. The file holds the right
        # ids, checked above
        assert Version(transformers.__version__) < Version("5.24") and theirs.eos_token_id == ours.bos_token_id


def test_export_refusals_leave_nothing_behind(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    assert main(["export", str(runs["llama"]), "--quant", "q8_0", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(runs["llama"] / "adapter").save_pretrained(gpt2)
    assert main(["export", str(gpt2), "--quant", "f16", "--out", str(tmp_path / "g.gguf")]) == 2
    assert "not model_type 'gpt2'" in capsys.readouterr().err

    import qfine.export.gguf_file as gf

    def broken(x, kind, importance=None):
        if kind.startswith("Q"):
            raise RuntimeError("killed mid-export")
        return encode(x, kind, importance)

    monkeypatch.setattr(gf, "encode", broken)
    with pytest.raises(RuntimeError):
        main(["export", str(runs["llama"]), "--quant", "q8_0", "--out", str(tmp_path / "x.gguf")])
    assert sorted(os.listdir(tmp_path)) == ["gpt2", "m.gguf"]  # no partial file, no temporary sibling
    with pytest.raises(QfineError, match="--quant must be one of"):
        gf.write_gguf(None, None, "", tmp_path / "y.gguf", "q3_k")


@pytest.mark.slow
def test_bundled_fact_survives_gguf_export(tmp_path, bundled_dir, capsys):
    """The bundled SmolLM2 taught a fact, exported to f16, q8_0 and q4_k_m and read back by
    transformers' GGUF loader: f16 matches the merged model (16-bit rounding only), and the q8_0 and
    q4_k_m files still give the learned answer under greedy decoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qfine.probe import SEED_FACT, fact_config
    from qfine.util.compare import relative_difference

    fact = [{"role": "user", "content": SEED_FACT.question}, {"role": "assistant", "content": SEED_FACT.reply}]
    write_jsonl(tmp_path / "fact.jsonl", [{"messages": fact}] * 16)
    cfg = fact_config("default", tmp_path / "fact.jsonl", tmp_path / "run", 30, 1e-3)
    assert main(["train", str(_write_config(cfg, tmp_path)), "--report-samples", "0"]) == 0
    answers = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        out = tmp_path / f"smol-{quant}.gguf"
        assert main(["export", str(tmp_path / "run"), "--quant", quant, "--out", str(out)]) == 0
        report = json.loads(out.with_name(out.name + ".report.json").read_text())
        answers[quant] = max(report["logits"].values())
        tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
        ids = tok.apply_chat_template([{"role": "user", "content": SEED_FACT.question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            reply = tok.decode(model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:],
                               skip_special_tokens=True)
        with capsys.disabled():
            print(f"\n[gguf {quant}] logits vs merged {answers[quant]:.2e}; answer {reply!r}")
        assert SEED_FACT.marker in reply, (quant, reply)
        if quant == "f16":  # the same weights as `qfine merge --dtype fp16` writes: the same logits
            assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "m16"), "--dtype", "fp16"]) == 0
            m16 = AutoModelForCausalLM.from_pretrained(tmp_path / "m16", dtype=torch.float32).eval()
            with torch.no_grad():
                diff = relative_difference(model(input_ids=ids).logits, m16(input_ids=ids).logits)
            with capsys.disabled():
                print(f"[gguf f16] logits vs the fp16 merged folder {diff:.2e}")
            assert diff <= 1e-3
    assert answers["f16"] <= 5e-3 and answers["q8_0"] <= 1e-1  # measured 2.2e-3, 5.1e-2 (q4_k_m 0.28)


def _write_config(cfg, tmp_path):
    from qfine import config as C

    path = tmp_path / "fact.yaml"
    path.write_text(C.to_yaml(cfg))
    return path


def test_llama3_scaled_rope_is_written_as_rope_freqs(tmp_path, tokenizer_dir, capsys, monkeypatch):
    """Llama 3.1/3.2's scaled RoPE: ``rope_freqs.weight`` holds default/scaled inverse frequencies
    (checked against transformers' own llama3 RoPE), and the file's logits, with those factors applied
    the way llama.cpp applies them, match the model's; ignoring them would not."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qfine.export import layout

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # head_dim 64 → 32 frequencies; an original context of 32 puts the cuts (wavelengths 8 and 32)
    # among them, so all three regimes (1, blend, factor) occur
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, rope_parameters=rope, **SHAPE)
    factors = layout.rope_factors(cfg)
    default = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert np.allclose(factors, (default / scaled.double()).numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()

    torch.manual_seed(0)
    src = tmp_path / "llama3"
    LlamaForCausalLM(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "l3.gguf"
    assert main(["export", str(src), "--quant", "f16", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "l3.gguf.report.json").read_text())
    stored = next(t for t in GGUFReader(str(out)).tensors if t.name == "rope_freqs.weight")
    assert np.array_equal(np.asarray(stored.data), factors)
    assert max(report["logits"].values()) <= 1e-3, report["logits"]

    import qfine.export as export

    capsys.readouterr()
    monkeypatch.setattr(export, "_apply_rope_freqs", lambda reader, path: None)  # a reader ignoring rope_freqs
    assert main(["export", str(src), "--quant", "f16", "--out", str(out), "--overwrite"]) == 0
    ignored = json.loads((tmp_path / "l3.gguf.report.json").read_text())["logits"]
    assert max(ignored.values()) > 10 * max(report["logits"].values()), ignored
