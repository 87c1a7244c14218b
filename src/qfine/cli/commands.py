"""Subcommands beyond train/generate/chat: merge, eval, data (preview, chitchat) and demo."""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from pathlib import Path

from qfine.models.sources import check_target
from qfine.util.errors import QfineError


def cmd_merge(ns) -> None:
    """Exact merge of a run's adapter into a 16-bit model folder (optionally requantized)."""
    from qfine.export.merge import requantize, save_merged
    from qfine.generation.serve import is_run_dir, load_for_inference

    if not is_run_dir(ns.run_dir):
        raise QfineError(f"{ns.run_dir} is not a finished qfine run (config.yaml and adapter/ expected)")
    out = Path(ns.out)
    if out.exists() and not ns.overwrite:
        raise QfineError(f"{out} already exists; pass --overwrite to replace it")
    from qfine import config as C

    run_cfg = C.load_yaml(Path(ns.run_dir) / "config.yaml")
    task = run_cfg.model.task
    fmt = getattr(ns, "format", "auto")
    int4 = fmt == "int4" or (fmt == "auto" and run_cfg.lora.method == "qa-lora" and not ns.requantize)
    if int4 and run_cfg.model.quantization != "int4":
        raise QfineError(f"--format int4 folds a QA-LoRA update into an int4 base; this run's base is "
                         f"{run_cfg.model.quantization} (merge to 16-bit: --format 16bit)")
    if ns.requantize and task != "causal-lm":
        raise QfineError(f"--requantize serves causal-lm runs; this is a {task} run: merge it to 16-bit instead")
    loaded = load_for_inference(ns.run_dir, task=getattr(ns, "task", None))
    if ns.base == "pristine":
        print("[qfine] merging onto the pristine 16-bit weights: this adds back the quantization error the adapter "
              "never saw during training, so the result differs from the trained model", flush=True)
    t0 = time.perf_counter()
    if ns.requantize:
        tmp16 = out.with_name(f".{out.name}.merged16")
        save_merged(loaded.model, loaded.tokenizer, tmp16, ns.dtype, ns.base, loaded.source, overwrite=True)
        try:
            requantize(tmp16, out, ns.requantize, overwrite=ns.overwrite)
        finally:
            shutil.rmtree(tmp16, ignore_errors=True)
        _report_requantized(loaded, out)
    else:
        save_merged(loaded.model, loaded.tokenizer, out, ns.dtype, ns.base, loaded.source, overwrite=ns.overwrite,
                    int4=int4)
    kind = "4-bit (codes unchanged, the update folded into the zero points)" if int4 else ns.dtype
    print(f"[qfine] merged model ({kind}) written to {out} in {time.perf_counter() - t0:.1f} s", flush=True)


def cmd_export(ns) -> None:
    """A run or merged folder as a deployment file: GGUF (f16 … q4_k_m) or a bitsandbytes 4-bit folder."""
    if ns.format == "bnb-nf4":
        import argparse

        cmd_merge(argparse.Namespace(run_dir=ns.source, out=ns.out, dtype="bf16", base="dequantized",
                                     requantize="nf4", overwrite=ns.overwrite))
        return
    from qfine.export import export_gguf

    if not ns.quant:
        raise QfineError("--format gguf needs --quant: f16, bf16, q8_0, q4_0, q4_1, q4_k_m, q5_k_m or q6_k")
    report = export_gguf(ns.source, ns.out, ns.quant, overwrite=ns.overwrite, check=not ns.no_check)
    print(report.summary())
    print(f"[qfine] report: {ns.out}.report.json", flush=True)


def _report_requantized(loaded, out: Path) -> float:
    """Print (and return) the logit difference of a requantized merge against the unmerged model."""
    import torch
    from transformers import AutoModelForCausalLM

    from qfine.generation.serve import encode_prompt
    from qfine.quant.bnb4 import guard_cpu_repack
    from qfine.util.compare import relative_difference

    ids = encode_prompt(loaded.tokenizer, [{"role": "user", "content": "Tell me about yourself."}]).to(loaded.device)
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits.float()
        q = AutoModelForCausalLM.from_pretrained(out, device_map={"": loaded.device})
        guard_cpu_repack(q)
        got = q(input_ids=ids).logits.float()
    diff = relative_difference(got, ref)
    print(f"[qfine] requantized merge: logits differ from the unmerged trained model by {diff:.3e} "
          "(relative L2) — lossy by design", flush=True)
    return diff


def cmd_demo(ns) -> None:
    """Teach the bundled model one fact; show answers before, after, and after merging."""
    from qfine.probe import SEED_FACT, fact_config, seed_experiment

    out = Path(ns.output_dir or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and any(out.iterdir()):
        raise QfineError(f"{out} already exists; choose another --output-dir")
    t0 = time.perf_counter()
    cfg = fact_config(ns.model, out / "data.jsonl", out / "run", ns.steps, ns.learning_rate)
    print("qfine demo — teach one fact with QLoRA, then ask before training, after, and after merging\n")
    print(f"  fact:     {SEED_FACT.question!r} -> {SEED_FACT.reply!r}")
    print(f"  model:    {cfg.model.source} in 4-bit {cfg.model.quantization} (double quant {cfg.model.double_quant})")
    print(f"  LoRA:     r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} on "
          f"{','.join(cfg.lora.target_modules)}")
    print(f"  training: {cfg.train.max_steps} steps, batch {cfg.train.batch_size}, lr {cfg.train.learning_rate} "
          f"{cfg.train.lr_scheduler}, optimizer {cfg.train.optimizer}")
    print(f"  output:   {out}\n", flush=True)
    r = seed_experiment(SEED_FACT, out, source=ns.model, steps=ns.steps, lr=ns.learning_rate,
                        log=lambda s: print(f"  {s}", flush=True))
    knows = r.knows(SEED_FACT)
    print("\ntraining log (loss by logged step): " + ", ".join(f"{x:.4f}" for x in r.losses))
    print(f"\n{'stage':<44} knows '{SEED_FACT.marker}'?")
    rows = [("before training (4-bit base)", "before"), ("after training (4-bit base + adapter)", "after"),
            ("exact merge, bf16, plain transformers", "merged"), ("peft merge_and_unload (requantized 4-bit)",
                                                                   "peft_merged")]
    for label, key in rows:
        print(f"  {label:<42} {'yes' if knows[key] else 'no':<4} {getattr(r, key)[:70]!r}")
    print(f"\nlogits vs the trained model: exact merge {r.merged_rel_diff:.2e}, peft requantized "
          f"{r.peft_rel_diff:.2e} (relative L2)")
    print(f"training took {r.train_seconds:.0f} s; the whole demo {time.perf_counter() - t0:.0f} s")
    if not ns.keep:  # the merged copy of the model and the resume checkpoints are what weigh
        shutil.rmtree(r.merged_dir, ignore_errors=True)
        shutil.rmtree(r.run_dir / "checkpoints", ignore_errors=True)
    kept = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"kept {kept / 2**20:.0f} MiB in {out}" + ("" if ns.keep else " (the adapter and report; --keep keeps the "
                                                       "merged model and checkpoints too)"))
    print(f"try it:  {_command_name()} generate {r.run_dir} --prompt \"{SEED_FACT.question}\"")


def _command_name() -> str:
    """How the user can call qfine again: ``qfine`` when that is on PATH and is this program, else the
    path of this program (``.venv/bin/qfine`` after ``make demo``, whose venv is not activated)."""
    import os
    import sys

    me = Path(sys.argv[0])
    found = shutil.which("qfine")
    if me.name != "qfine" or (found and Path(found).resolve() == me.resolve()):
        return "qfine"
    try:
        return os.path.relpath(me)
    except ValueError:
        return str(me)


def cmd_data_preview(ns) -> None:
    """Show the detected format, a rendered example with its loss mask, and token lengths."""
    import sys

    from qfine import config as C
    from qfine.data.preview import preview
    from qfine.models.loading import load_tokenizer
    from qfine.models.sources import resolve_source

    cfg = C.DataConfig(path=ns.file)
    C.apply_overrides(C.RunConfig(data=cfg), {("data", k): v for k, v in (
        ("max_seq_len", ns.max_seq_len), ("format", ns.format), ("template", ns.template), ("columns", ns.columns),
        ("loss_on", ns.loss_on), ("too_long", ns.too_long), ("on_bad_rows", ns.on_bad_rows)) if v is not None})
    preview(ns.file, load_tokenizer(resolve_source(ns.model)), cfg, sys.stdout, ns.example)


def cmd_data_chitchat(ns) -> None:
    """Convert the chitchat-dataset package to messages JSONL (train.jsonl + eval.jsonl)."""
    from qfine.data.chitchat import convert

    n_train, n_eval = convert(ns.out, ns.limit, max_turns=ns.max_turns)
    print(f"wrote {n_train} training and {n_eval} eval conversations to {ns.out}/train.jsonl, eval.jsonl")


def cmd_data_sentiment(ns) -> None:
    """Write the lexicon-based sentiment task (train.jsonl + eval.jsonl, eval words unseen in training)."""
    from qfine.data.sentiment import build

    n_train, n_eval = build(ns.out, ns.words)
    print(f"wrote {n_train} training and {n_eval} eval rows to {ns.out}/train.jsonl, eval.jsonl "
          "(the eval rows' sentiment words never occur in training)")


def cmd_eval(ns) -> None:
    """Perplexity and generation metrics for a run (base / base+adapter / merged) or a model."""
    check_target(ns.target)
    import dataclasses
    import json
    import sys

    from qfine import config as C
    from qfine.evaluation.metrics import parse_metrics
    from qfine.evaluation.run import compare_run, evaluate_model, format_table, load_examples
    from qfine.generation.serve import is_run_dir, load_for_inference
    from qfine.models.loading import load_model

    metrics = parse_metrics(ns.metrics or "perplexity")
    data = C.DataConfig(max_seq_len=ns.max_seq_len or 512)
    max_new = ns.max_new_tokens or 64
    rows: dict[str, dict[str, float]] = {}
    if ns.compare_quant:
        if is_run_dir(ns.target):
            raise QfineError("--compare-quant takes a model source, not a run directory")
        examples = None
        for q in [q.strip() for q in ns.compare_quant.split(",") if q.strip()]:
            loaded = load_model(C.ModelConfig(source=ns.target, quantization=q))
            loaded.model.eval()
            if examples is None:  # same tokenizer for every precision: tokenize once
                examples = load_examples(ns.data, loaded.tokenizer, data, ns.limit)
            rows[q] = evaluate_model(loaded, examples, metrics, max_new)[0]
            del loaded
        first = "base precision"
    elif is_run_dir(ns.target):
        loaded = load_for_inference(ns.target, task=ns.task)
        # rows are read, templated and masked as the run's training data were (system prompt, format,
        # columns, template, loss_on); only the length limit follows the flag when it is given
        # a multi-task run evaluates every row of --data with the --task adapters (give that task's rows)
        data = dataclasses.replace(loaded.data, path=ns.data, eval_path=None, streaming=False, packing=False,
                                   max_seq_len=ns.max_seq_len or loaded.data.max_seq_len, task_column="")
        if loaded.task != "causal-lm":
            return _eval_task_run(ns, loaded, data)
        examples = load_examples(ns.data, loaded.tokenizer, data, ns.limit)
        rows = compare_run(loaded, examples, metrics, max_new)
        first = "model"
    else:
        as_asked = C.ModelConfig(quantization=ns.quantization) if ns.quantization else None
        loaded = load_for_inference(ns.target, as_asked, task=ns.task)
        examples = load_examples(ns.data, loaded.tokenizer, data, ns.limit)
        rows[ns.target] = evaluate_model(loaded, examples, metrics, max_new)[0]
        first = "model"
    if ns.output == "json":
        json.dump({"target": ns.target, "data": ns.data, "examples": len(examples), "results": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"{ns.target} on {ns.data} ({len(examples)} examples)")
        print(format_table(rows, first))


def _generation_overrides(ns, gen):
    """The run's generation settings with the command line's --num-beams etc. applied."""
    import dataclasses

    given = {k: getattr(ns, k, None) for k in ("num_beams", "length_penalty", "min_new_tokens", "max_new_tokens")}
    return dataclasses.replace(gen, **{k: v for k, v in given.items() if v is not None})


def _eval_task_run(ns, loaded, data) -> None:
    """qfine eval for a seq-cls run (accuracy, macro-F1, confusion matrix) or a seq2seq run (ROUGE/BLEU)."""
    import json
    import sys

    from qfine.evaluation.metrics import parse_metrics
    from qfine.evaluation.run import format_table
    from qfine.evaluation.tasks import compare_classifier, compare_seq2seq

    confusion = None
    if loaded.task == "seq-cls":
        rows, confusion, n = compare_classifier(loaded, ns.data, data, ns.limit)
    else:
        loaded.generation = _generation_overrides(ns, loaded.generation)
        rows, n = compare_seq2seq(loaded, ns.data, data, parse_metrics(ns.metrics or "rouge,bleu"), ns.limit)
    if ns.output == "json":
        out = {"target": ns.target, "data": ns.data, "examples": n, "results": rows}
        if confusion is not None:
            out.update(labels=loaded.labels, confusion=confusion)
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print(f"{ns.target} on {ns.data} ({n} examples)")
    print(format_table(rows, "model"))
    if confusion is not None:
        from qfine.objectives.classify import confusion_table

        print("\nconfusion matrix of base+adapter (rows: true label, columns: predicted)")
        print(confusion_table(confusion, loaded.labels))


def cmd_predict(ns) -> None:
    """Labels with probabilities (seq-cls runs) or generated targets (seq2seq runs), one line per input."""
    import json
    import sys

    from qfine.generation.serve import generate, is_run_dir, load_for_inference

    if not is_run_dir(ns.run_dir):
        raise QfineError(f"{ns.run_dir} is not a finished qfine run (config.yaml and adapter/ expected)")
    if not ns.text and not ns.data:
        raise QfineError("give --text TEXT (repeatable) or --data FILE")
    loaded = load_for_inference(ns.run_dir)
    field = {"seq-cls": "text", "seq2seq": "source"}.get(loaded.task, "prompt")
    texts = list(ns.text or [])
    if ns.data:
        from qfine.data.rows import RowStats, read_fields

        texts += [v[0] for _, v in read_fields(ns.data, loaded.data, ("text" if field == "prompt" else field,),
                                               RowStats())]
    if loaded.task == "seq-cls":
        from qfine.objectives.classify import predict

        results = predict(loaded.model, loaded.tokenizer, texts, loaded.labels, loaded.data.max_seq_len)
    elif loaded.task == "seq2seq":
        from qfine.objectives.seq2seq import generate as generate_targets

        gen = _generation_overrides(ns, loaded.generation)
        results = [{"output": t} for t in generate_targets(loaded.model, loaded.tokenizer, texts, gen,
                                                          loaded.data.max_seq_len)]
    else:
        results = [{"output": generate(loaded, t, max_new_tokens=ns.max_new_tokens or 128)} for t in texts]
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
    """Add this module's subcommands to the CLI's subparsers."""
    data = sub.add_parser("data", help="inspect training data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("preview", help="detected format, one rendered example with the loss mask, token lengths")
    p.add_argument("file", help="data file, glob, save_to_disk folder or hub dataset id")
    p.add_argument("--model", default="default", help="whose tokenizer and chat template to use")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--format")
    p.add_argument("--template")
    p.add_argument("--columns", help="field=column,... mapping")
    p.add_argument("--loss-on")
    p.add_argument("--too-long")
    p.add_argument("--on-bad-rows")
    p.add_argument("--example", type=int, default=0, help="index of the row to render")
    p.set_defaults(func=cmd_data_preview)
    p = data.add_parser("chitchat", help="convert the chitchat-dataset package (MIT) to messages JSONL")
    p.add_argument("--out", default="data/chitchat", help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--limit", type=int, help="conversations to convert (default: all ~7k)")
    p.add_argument("--max-turns", type=int, default=8, help="turns kept per conversation")
    p.set_defaults(func=cmd_data_chitchat)
    p = data.add_parser("sentiment", help="a sentiment task from the VADER lexicon's human ratings (vaderSentiment, MIT)")
    p.add_argument("--out", default="data/sentiment", help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--words", type=int, default=200, help="positive words (and as many negative) to use")
    p.set_defaults(func=cmd_data_sentiment)

    p = sub.add_parser("merge", help="exact merge of a run's adapter into a 16-bit model",
                       description="W = cast(dequant(W4).float() + scaling * B @ A) per adapted layer, written as "
                                   "sharded safetensors that plain transformers loads.")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--out", required=True, help="output folder (written to a temporary sibling, then renamed)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the merged weights")
    p.add_argument("--base", default="dequantized", choices=["dequantized", "pristine"],
                   help="merge onto the dequantized 4-bit weights the adapter was trained against (default), or "
                        "onto the original 16-bit weights (adds the quantization error the adapter never saw)")
    p.add_argument("--requantize", choices=["nf4", "fp4"],
                   help="write a bitsandbytes 4-bit merged model instead (lossy; the logit difference is printed)")
    p.add_argument("--format", default="auto", choices=["auto", "16bit", "int4"],
                   help="int4: keep a QA-LoRA run's base 4-bit, the update folded into its zero points (lossless); "
                        "16bit: dequantize and add (--dtype); auto: int4 for QA-LoRA runs, 16bit otherwise")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--task", help="a multi-task run: merge the shared adapter and this task's")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="a run or merged model as GGUF (llama.cpp, Ollama, LM Studio) or bnb 4-bit",
                       description="Merge exactly, then write one GGUF file in-process (no llama.cpp build) with a "
                                   "report of every tensor's type and error and the file's logits read back.")
    p.add_argument("source", help="a finished run directory, or a model folder (e.g. a qfine merge output)")
    p.add_argument("--format", choices=["gguf", "bnb-nf4"], default="gguf")
    p.add_argument("--quant", choices=["f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"],
                   help="GGUF file type (K-quant mixes as llama.cpp's: attn_v/ffn_down of some layers and the "
                        "output at 6 bits)")
    p.add_argument("--out", required=True, help="FILE.gguf (or a folder for bnb-nf4); written to a temporary "
                                                "sibling and renamed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-check", action="store_true", help="skip reading the file back to compare logits")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="perplexity and generation metrics; base vs adapter vs merged for a run")
    p.add_argument("target", help="a run directory, or a model source (folder, .gguf, hub id, default)")
    p.add_argument("--data", required=True, help="evaluation data (any format qfine train reads)")
    p.add_argument("--metrics", help="comma list of perplexity,bleu,chrf,rouge,exact_match,accuracy (default: "
                                      "perplexity; seq2seq runs rouge,bleu; seq-cls runs always accuracy and macro-F1)")
    p.add_argument("--limit", type=int, help="evaluate the first N rows only")
    p.add_argument("--max-new-tokens", type=int, help="generation length for the generation metrics (default 64, "
                                                      "or a seq2seq run's generation.max_new_tokens)")
    _add_generation_settings(p)
    p.add_argument("--max-seq-len", type=int,
                   help="truncate examples for perplexity (default: the run's data.max_seq_len, else 512)")
    p.add_argument("--quantization", choices=["nf4", "fp4", "int8", "none"],
                   help="quantize a plain model source on load (its measured cost is printed); default: as written")
    p.add_argument("--compare-quant", help="e.g. nf4,fp4,int8,none: one row per base precision of a model source")
    p.add_argument("--output", choices=["table", "json"], default="table")
    p.add_argument("--task", help="a multi-task run: evaluate with the shared adapter and this task's active")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="labels with probabilities (seq-cls runs) or outputs (seq2seq runs)")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--text", action="append", help="an input text (repeat for several)")
    p.add_argument("--data", help="a data file: its text (seq-cls) or source (seq2seq) column is read")
    p.add_argument("--max-new-tokens", type=int, help="seq2seq/causal-lm: generate at most this many tokens")
    _add_generation_settings(p)
    p.add_argument("--output", choices=["text", "json"], default="text", help="text lines or JSON lines")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="teach the bundled model one fact; compare before/after/merged answers")
    p.add_argument("--model", default="default", help="model source (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--output-dir", help="where the run goes (default: runs/demo-<timestamp>)")
    p.add_argument("--keep", action="store_true", help="keep the merged model and the checkpoints (~300 MiB)")
    p.set_defaults(func=cmd_demo)
