"""Evaluation: `peftkit predict` (generate and score, LLaMA-Factory's metrics) and `peftkit eval` (loss, perplexity)."""

from .metrics import sample_scores, similarity
from .predict import run_eval, run_predict

__all__ = ["run_eval", "run_predict", "sample_scores", "similarity"]
