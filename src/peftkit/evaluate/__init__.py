"""Evaluation: `peftkit predict` (generate and score, LLaMA-Factory's metrics), `peftkit eval` (loss, perplexity, or
a multiple-choice benchmark: MMLU, CMMLU, C-Eval)."""

from .benchmark import accuracy_table, run_benchmark
from .metrics import sample_scores, similarity
from .predict import run_eval, run_predict

__all__ = ["accuracy_table", "run_benchmark", "run_eval", "run_predict", "sample_scores", "similarity"]
