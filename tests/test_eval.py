"""Evaluation: metric values on known inputs, perplexity against a direct computation, run comparison."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import FACT, write_jsonl
from qfine.cli import main
from qfine.config import DataConfig
from qfine.evaluation import load_examples, perplexity, score_generations
from qfine.evaluation.metrics import parse_metrics
from qfine.generation.load import load_for_inference
from qfine.util.errors import QfineError


def test_metrics_on_known_inputs():
    preds = ["The cat sat on the mat.", "Paris", "yes, it is blue"]
    refs = ["The cat sat on the mat.", "paris.", "blue"]
    s = score_generations(preds, refs, ["bleu", "chrf", "rouge", "exact_match", "accuracy"])
    assert s["exact_match"] == pytest.approx(200 / 3)  # the first two match after normalisation
    assert s["accuracy"] == pytest.approx(100.0)  # every reference appears in its prediction
    same = score_generations(refs, refs, ["bleu", "chrf", "rouge"])
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    assert same["rougeL"] == pytest.approx(100.0)
    assert s["rougeL"] < 100.0 and s["chrf"] < 100.0
    with pytest.raises(QfineError, match="unknown metric"):
        parse_metrics("perplexity,bleurt")


def test_perplexity_matches_direct_loss(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "e.jsonl", [{"messages": FACT}, {"prompt": "Say hi", "completion": "Hi there!"}])
    loaded = load_for_inference(str(tiny_dir))
    examples = load_examples(data, loaded.tokenizer, DataConfig())
    got = perplexity(loaded.model, examples, batch_size=2)  # padded batch of two
    nll = count = 0
    for e in examples:  # one at a time, through the model's own loss (mean over label tokens)
        dev = next(loaded.model.parameters()).device
        ids, labels = torch.tensor([e.encoded.input_ids], device=dev), torch.tensor([e.encoded.labels], device=dev)
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += float(loaded.model(input_ids=ids, labels=labels).loss) * n
        count += n
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_eval_cli_compares_base_adapter_merged(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 8)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(run), "--max-steps", "20",
                 "--learning-rate", "2e-2", "--lr-scheduler", "constant", "--lora-dropout", "0",
                 "--compute-dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--limit", "2", "--metrics", "perplexity,exact_match,accuracy",
                 "--max-new-tokens", "16", "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["results"]
    assert list(r) == ["base", "base+adapter", "merged"]
    assert r["base+adapter"]["perplexity"] < 0.5 * r["base"]["perplexity"]
    assert r["merged"]["perplexity"] == pytest.approx(r["base+adapter"]["perplexity"], rel=1e-4)
    assert r["base+adapter"]["accuracy"] == r["merged"]["accuracy"]
    assert main(["eval", str(run), "--data", str(data), "--limit", "1"]) == 0
    table = capsys.readouterr().out
    assert "base+adapter" in table and "perplexity" in table


def test_compare_quant_rows(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": FACT}] * 2)
    assert main(["eval", str(tiny_dir), "--data", str(data), "--compare-quant", "nf4,fp4,int8,none",
                 "--output", "json"]) == 0
    r = json.loads(capsys.readouterr().out)["results"]
    assert list(r) == ["nf4", "fp4", "int8", "none"]
    ppl = {k: v["perplexity"] for k, v in r.items()}
    assert all(math.isfinite(v) for v in ppl.values())
    assert len(set(round(v, 6) for v in ppl.values())) == 4  # each precision is a different model
