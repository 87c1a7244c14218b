"""``qfine generate``, ``qfine chat`` and ``qfine predict``: a run, a merged folder or a GGUF answering inputs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from qfine import config as C
from qfine.models.sources import check_target
from qfine.util.errors import QfineError


def _model_cfg(ns) -> C.ModelConfig | None:
    """How to load a plain model source: as written unless --quantization asks otherwise."""
    return C.ModelConfig(quantization=ns.quantization) if ns.quantization else None


def cmd_generate(ns):
    check_target(ns.target)
    from qfine.generation.generate import generate
    from qfine.generation.load import load_for_inference
    from qfine.models.heads import head_of
    from qfine.objectives import for_task

    loaded = load_for_inference(ns.target, _model_cfg(ns), task=ns.task)
    head = head_of(loaded.task)
    if head.labelled:
        raise QfineError(f"{ns.target} is a {loaded.task} run: it predicts labels; use qfine predict {ns.target} "
                         "--text ...")
    if head.chat:
        text = generate(loaded, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_p)
    else:  # the prompt is the source text, no chat template
        gen = dataclasses.replace(loaded.generation, max_new_tokens=ns.max_new_tokens)
        text = for_task(loaded.task).predict(loaded, [ns.prompt], gen)[0]["output"]
    sys.stdout.write(text + "\n")


def cmd_chat(ns):
    check_target(ns.target)
    from qfine.generation.chat import chat
    from qfine.generation.load import load_for_inference

    chat(load_for_inference(ns.target, _model_cfg(ns), task=ns.task), ns.max_new_tokens, ns.temperature, ns.top_p)


def _add_generation_flags(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("target", help="a run directory (base + adapter), or a model source (folder, .gguf, hub id, default)")
    p.add_argument("--max-new-tokens", type=int, default=max_new, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    p.add_argument("--quantization", choices=["nf4", "fp4", "int8", "none"],
                   help="quantize a plain model source on load (its measured cost is printed); default: serve it as "
                        "written (a merged folder in its saved dtype, a GGUF at its file's precision; a run directory "
                        "always loads its base as trained, plus the adapter)")
    p.add_argument("--task-adapter", dest="task", metavar="NAME", help="a multi-task run: the task whose adapter is active with the shared one")


def _generation_overrides(ns, gen):
    """The run's generation settings with the command line's --num-beams etc. applied."""
    given = {k: getattr(ns, k, None) for k in ("num_beams", "length_penalty", "min_new_tokens", "max_new_tokens")}
    return dataclasses.replace(gen, **{k: v for k, v in given.items() if v is not None})


def cmd_predict(ns) -> None:
    """Labels with probabilities (seq-cls runs) or generated targets (seq2seq runs), one line per input."""
    from qfine.data.rows import RowStats, read_fields
    from qfine.generation.load import is_run_dir, load_for_inference
    from qfine.objectives import for_task

    if not is_run_dir(ns.run_dir):
        raise QfineError(f"{ns.run_dir} is not a finished qfine run (config.yaml and adapter/ expected)")
    if not ns.text and not ns.data:
        raise QfineError("give --text TEXT (repeatable) or --data FILE")
    loaded = load_for_inference(ns.run_dir)
    objective = for_task(loaded.task)
    field = "text" if objective.sample_field == "prompt" else objective.sample_field  # a chat run reads plain text
    texts = list(ns.text or [])
    if ns.data:
        texts += [v[0] for _, v in read_fields(ns.data, loaded.data, (field,), RowStats())]
    results = objective.predict(loaded, texts, _generation_overrides(ns, loaded.generation))
    for text, r in zip(texts, results):
        if ns.output == "json":
            sys.stdout.write(json.dumps({"input": text, **r}, ensure_ascii=False) + "\n")
        elif "label" in r:
            probs = " ".join(f"{k}={v:.3f}" for k, v in r["probabilities"].items())
            sys.stdout.write(f"{r['label']}\t{probs}\t{text}\n")
        else:
            sys.stdout.write(r["output"] + "\n")


def _add_generation_settings(p) -> None:
    p.add_argument("--num-beams", type=int, help="beams (default: the run's generation.num_beams)")
    p.add_argument("--length-penalty", type=float, help="beam-search length penalty (default: the run's)")
    p.add_argument("--min-new-tokens", type=int, help="generate at least this many tokens (default: the run's)")




def register(sub) -> None:
    """Add generate, chat and predict to the CLI's subparsers."""
    p = sub.add_parser("generate", help="print the model's completion of one prompt")
    _add_generation_flags(p, 128)
    p.add_argument("--prompt", required=True, help="user message (the chat template is applied)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    _add_generation_flags(p, 256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("predict", help="labels with probabilities (seq-cls runs) or outputs (seq2seq runs)")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--text", action="append", help="an input text (repeat for several)")
    p.add_argument("--data", help="a data file: its text (seq-cls) or source (seq2seq) column is read")
    p.add_argument("--max-new-tokens", type=int, help="seq2seq/causal-lm: generate at most this many tokens")
    _add_generation_settings(p)
    p.add_argument("--output", choices=["text", "json"], default="text", help="text lines or JSON lines")
    p.set_defaults(func=cmd_predict)
