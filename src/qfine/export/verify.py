"""``qfine export --verify``: a GGUF file scored by llama.cpp itself against the merged model.

llama.cpp runs as node-llama-cpp's prebuilt CPU binaries (llama.cpp 80fb11a), driven by
``tools/llamacpp/run.mjs`` of a qfine checkout (``make llamacpp`` installs it from the npm
registry), or by the copy in the folder that ``QFINE_LLAMACPP`` names. The scores:

* **tokens**: llama.cpp's token ids of :data:`STRINGS` (contractions, digits, whitespace runs,
  accents, CJK, emoji, code) against the tokenizer's; each string that differs is a place where the
  deployed model reads different input than the trained one;
* **next-token distributions** on held-out text (the run's eval rows; its first training rows when it
  has none; ``--verify-data``; else :data:`STRINGS`): the same token ids through the merged model
  (fp32, transformers) and through llama.cpp; KL(merged ‖ file) in nats per position (mean, 99th
  percentile, max) and how often both put the same token first. The f16 file of a model measures the
  runtime's own arithmetic (about 1e-6 nats); a quantized file adds its quantization error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from qfine.util.errors import QfineError

STRINGS = [
    "Hello world", "I'm here", "you're", "we've", "they'll", "she'd", "it's", "DON'T", "I'VE", "'s alone",
    "3", "33", "333", "3333", "12345678", "3.14159", "1,000,000", "2026-12-03",
    "  two spaces", "trailing   ", "tab\there", "\n\nnewlines\n", "   \n  mixed \t\n",
    "café naïve résumé", "Ångström Zürich", "我想在apple工作", "日本語のテキスト", "нещо на Български",
    "🚀 rocket 😶‍🌫️ emoji 🦙🦙", "def f(x):\n    return x ** 2  # square",
    "if (a && b) { return c[i]; }", "<html><b>bold</b></html>", "`code` and ```fences```",
    "\"quoted\" 'single' (paren) [bracket]", "......!!!!!!??????", "------=======",
]
MAX_TEXTS, MAX_TOKENS = 8, 128  # llama.cpp hands back each distribution as a sorted map: ~40 ms a position
MISSING = ("llama.cpp is not installed here: run `make llamacpp` in a qfine checkout (node-llama-cpp from the npm "
           "registry), or set QFINE_LLAMACPP to a folder holding run.mjs and its node_modules")
_CHECKOUT = Path(__file__).resolve().parents[3] / "tools" / "llamacpp"


def runtime_dir() -> Path | None:
    """The folder with run.mjs and node-llama-cpp installed beside it (None: no llama.cpp here)."""
    folder = Path(os.environ.get("QFINE_LLAMACPP") or _CHECKOUT)
    ok = shutil.which("node") and (folder / "run.mjs").is_file() and (folder / "node_modules" / "node-llama-cpp").is_dir()
    return folder if ok else None


def llamacpp(request: dict, timeout: int = 900) -> dict:
    """Run one request through run.mjs (see its header for the fields); its JSON answer."""
    folder = runtime_dir()
    if folder is None:
        raise QfineError(MISSING)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        done = subprocess.run(["node", str(folder / "run.mjs"), f.name], capture_output=True, text=True,
                              timeout=timeout, cwd=folder)
    finally:
        Path(f.name).unlink()
    if done.returncode != 0:
        raise QfineError(f"llama.cpp could not run {request.get('model')}: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def next_token_probs(gguf: Path, sequences: list[list[int]], n_vocab: int) -> list[np.ndarray]:
    """llama.cpp's next-token probabilities (positions, n_vocab) fp32 for each token-id sequence."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probs.f32"
        llamacpp({"model": str(gguf), "evaluate": sequences, "probs_out": str(out), "n_vocab": n_vocab})
        flat = np.fromfile(out, dtype=np.float32).reshape(-1, n_vocab)
    ends = np.cumsum([len(s) for s in sequences])
    return np.split(flat, ends[:-1])


def held_out(source: str, tokenizer, data: str | None) -> tuple[list[list[int]], str]:
    """Up to :data:`MAX_TEXTS` token-id sequences (≤ :data:`MAX_TOKENS` each) to score, and where
    they came from."""
    from qfine import config as C
    from qfine.data.pipeline import build_datasets
    from qfine.export.imatrix import training_rows

    def first(rows):
        return [list(r["input_ids"][:MAX_TOKENS]) for r in rows.select(range(min(MAX_TEXTS, len(rows))))]

    if not data and (Path(source) / "config.yaml").is_file():
        run = C.load_yaml(Path(source) / "config.yaml")
        if run.data.eval_path or run.data.eval_ratio:
            return first(build_datasets(tokenizer, run.data, run.train.seed)[1]), "the run's eval rows"
    rows, where = training_rows(source, tokenizer, data)
    if rows is None:
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
        return [bos + tokenizer.encode(s, add_special_tokens=False) for s in STRINGS], "qfine's test strings"
    return first(rows), f"{where}, first rows" if data else f"{where}: its first training rows (none held out)"


@torch.no_grad()
def verify(model, tokenizer, gguf: Path, sequences: list[list[int]], where: str) -> dict:
    """Score ``gguf`` against ``model`` (a PeftModel, merged for the check, or a plain causal LM):
    token agreement on :data:`STRINGS`, KL(model ‖ file) and top-1 agreement on ``sequences``."""
    from qfine.methods.lora import merged

    got = llamacpp({"model": str(gguf), "tokenize": STRINGS})["tokens"]
    want = [tokenizer.encode(s, add_special_tokens=False) for s in STRINGS]
    differ = [s for s, a, b in zip(STRINGS, got, want) if a != b]
    n_vocab = model.get_output_embeddings().weight.shape[0] if not hasattr(model, "peft_config") else \
        model.get_base_model().get_output_embeddings().weight.shape[0]
    theirs = next_token_probs(gguf, sequences, n_vocab)
    device = next(model.parameters()).device
    kls, same = [], 0
    with merged(model, torch.float32) if hasattr(model, "peft_config") else contextlib.nullcontext():
        for ids, q in zip(sequences, theirs):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0].float(), -1).cpu()
            logq = torch.from_numpy(np.log(np.maximum(q, 1e-30)))
            kls.append((logp.exp() * (logp - logq)).sum(-1))
            same += int((logp.argmax(-1) == logq.argmax(-1)).sum())
    kl = torch.cat(kls).double()
    return {"runtime": "llama.cpp 80fb11a (node-llama-cpp 3.21.1)", "strings": len(STRINGS),
            "strings_identical": len(STRINGS) - len(differ), "strings_different": differ[:5],
            "text": where, "positions": int(kl.numel()), "kl_mean": float(kl.mean()),
            "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()), "top1_agreement": same / kl.numel()}


def summary(scores: dict) -> str:
    """One line of :func:`verify`'s scores."""
    line = (f"verified in {scores['runtime']}: tokens identical on {scores['strings_identical']}/{scores['strings']} "
            f"strings; on {scores['positions']} positions of {scores['text']}: KL(merged ‖ file) mean "
            f"{scores['kl_mean']:.2e}, p99 {scores['kl_p99']:.2e}, max {scores['kl_max']:.2e} nats; top-1 agreement "
            f"{100 * scores['top1_agreement']:.1f}%")
    if scores["strings_different"]:
        line += f"; tokenized differently: {scores['strings_different']!r}"
    return line
