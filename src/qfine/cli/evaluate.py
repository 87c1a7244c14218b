"""``qfine eval``: perplexity and generation metrics of a model, or of a run as base / base + adapter / merged."""

from __future__ import annotations

import dataclasses
import json
import sys

from qfine import config as C
from qfine.cli.serve import _add_generation_settings, _generation_overrides
from qfine.models.sources import check_target
from qfine.util.errors import QfineError


def cmd_eval(ns) -> None:
    """Perplexity and generation metrics for a run (base / base+adapter / merged) or a model."""
    check_target(ns.target)
    from qfine.evaluation.metrics import parse_metrics
    from qfine.evaluation.run import compare_run, evaluate_model, format_table, load_examples
    from qfine.generation.load import is_run_dir, load_for_inference
    from qfine.models.heads import head_of
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
        # a multi-task run evaluates every row of --data with the --task-adapter adapters (give that task's rows)
        data = dataclasses.replace(loaded.data, path=ns.data, eval_path=None, streaming=False, packing=False,
                                   max_seq_len=ns.max_seq_len or loaded.data.max_seq_len, task_column="")
        if not head_of(loaded.task).chat:
            return _eval_task_run(ns, loaded, data)
        train = C.load_yaml(f"{ns.target}/config.yaml").train
        if train.objective == "grpo":
            return _eval_rewards(ns, loaded, data, train)
        from qfine.objectives.pref_data import row_kind

        if row_kind(ns.data, data) == "pairs":
            return _eval_task_run(ns, loaded, data, "preference")
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


def _eval_task_run(ns, loaded, data, kind: str | None = None) -> None:
    """qfine eval for a run whose objective has its own comparison (:data:`qfine.evaluation.tasks.COMPARE`):
    a classifier (accuracy, macro-F1, confusion matrix), a seq2seq run (ROUGE/BLEU), or ``kind``
    preference: a causal-LM run on pairs (preference accuracy and margin)."""
    from qfine.evaluation.metrics import parse_metrics
    from qfine.evaluation.run import format_table
    from qfine.evaluation.tasks import COMPARE
    from qfine.objectives import for_task
    from qfine.objectives.classify import confusion_table

    loaded = dataclasses.replace(loaded, generation=_generation_overrides(ns, loaded.generation))
    compare = COMPARE[kind or for_task(loaded.task).name]
    rows, n, confusion = compare(loaded, ns.data, data, parse_metrics(ns.metrics or "rouge,bleu"), ns.limit)
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
        print("\nconfusion matrix of base+adapter (rows: true label, columns: predicted)")
        print(confusion_table(confusion, loaded.labels))




def _eval_rewards(ns, loaded, data, train) -> None:
    """qfine eval for a GRPO run: the mean of each of its rewards over greedy replies to the prompts of
    --data (up to --max-new-tokens, default the run's max_completion_len), base / base+adapter / merged."""
    from qfine.evaluation.run import format_table
    from qfine.evaluation.tasks import compare_rewards
    from qfine.objectives import rewards

    rows, n, _ = compare_rewards(loaded, ns.data, data, rewards.parse(train.rewards),
                                 ns.max_new_tokens or train.max_completion_len, ns.limit)
    if ns.output == "json":
        json.dump({"target": ns.target, "data": ns.data, "examples": n, "results": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print(f"{ns.target} on {ns.data} ({n} prompts, greedy replies)")
    print(format_table(rows, "model"))


def register(sub) -> None:
    """Add eval to the CLI's subparsers."""
    p = sub.add_parser("eval", help="perplexity and generation metrics; base vs adapter vs merged for a run")
    p.add_argument("target", help="a run directory, or a model source (folder, .gguf, hub id, default)")
    p.add_argument("--data", required=True, help="evaluation data (any format qfine train reads); for a causal-LM "
                   "run, preference pairs (prompt, chosen, rejected) score preference accuracy and margin")
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
    p.add_argument("--task-adapter", dest="task", metavar="NAME", help="a multi-task run: evaluate with the shared adapter and this task's active")
    p.set_defaults(func=cmd_eval)
