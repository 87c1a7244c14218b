"""Generation metrics from the standard libraries: sacrebleu (BLEU, chrF) and rouge-score (ROUGE-L).

All scores are on a 0–100 scale. ``exact_match`` compares normalised strings (case, surrounding
whitespace and punctuation, inner whitespace runs); ``accuracy`` counts a prediction right when the
normalised reference appears in the normalised prediction (lenient, for short answers and labels).
"""

from __future__ import annotations

import re
import string

from qfine.util.errors import QfineError

GENERATION_METRICS = ("bleu", "chrf", "rouge", "exact_match", "accuracy")
METRICS = ("perplexity", *GENERATION_METRICS)


def normalize(text: str) -> str:
    """Lower-case, trim punctuation at the ends, collapse whitespace."""
    return re.sub(r"\s+", " ", text.lower().strip().strip(string.punctuation + " ")).strip()


def parse_metrics(spec: str) -> list[str]:
    """``"perplexity,bleu"`` → ``["perplexity", "bleu"]``; unknown names are a QfineError."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise QfineError(f"unknown metric(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}")
    return names


def score_generations(predictions: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    """Corpus-level scores of ``predictions`` against ``references`` (one reference each)."""
    out: dict[str, float] = {}
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        if "bleu" in metrics:
            out["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
        if "chrf" in metrics:
            out["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        f = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        out["rougeL"] = 100 * sum(f) / len(f)
    if "exact_match" in metrics:
        out["exact_match"] = 100 * sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)
    if "accuracy" in metrics:
        out["accuracy"] = 100 * sum(normalize(r) in normalize(p) for p, r in zip(predictions, references)) / len(references)
    return out
