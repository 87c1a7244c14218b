"""Evaluation: perplexity over loss-bearing tokens, generation metrics, model comparisons."""

from qfine.evaluation.metrics import METRICS, score_generations
from qfine.evaluation.run import EvalExample, evaluate_model, load_examples, perplexity

__all__ = ["METRICS", "EvalExample", "evaluate_model", "load_examples", "perplexity", "score_generations"]
