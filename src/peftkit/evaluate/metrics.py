"""Text-similarity metrics for predictions, in LLaMA-Factory's convention so numbers compare with theirs.

Per sample: ROUGE-1/2/L F-scores (`rouge-chinese`) on jieba-segmented words, and BLEU-4 (nltk `sentence_bleu`,
smoothing method3) on characters; each x100, then averaged over samples. An empty prediction or label scores 0.
Character-level BLEU suits Chinese and still ranks English outputs; sacrebleu's corpus BLEU (13a tokenizer) is reported
beside it as the standard number for English.
"""

from __future__ import annotations

import logging
from typing import Sequence

KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def _words(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" banner on every first use
    return [w for w in jieba.cut(text) if w.strip()]


def sample_scores(prediction: str, label: str) -> dict[str, float]:
    """One sample's BLEU-4 and ROUGE F-scores, x100."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, reference = _words(prediction), _words(label)
    if not hypothesis or not reference:
        return dict.fromkeys(KEYS, 0.0)
    rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    scores = {f"rouge-{k}": round(rouge[f"rouge-{k}"]["f"] * 100, 4) for k in ("1", "2", "l")}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": round(bleu * 100, 4), **scores}


def similarity(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Averages of `sample_scores` over all pairs, plus `sacrebleu` (corpus BLEU, x100)."""
    import sacrebleu

    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not predictions:
        return {**dict.fromkeys(KEYS, 0.0), "sacrebleu": 0.0}
    per_sample = [sample_scores(pred, label) for pred, label in zip(predictions, labels)]
    means = {k: round(sum(s[k] for s in per_sample) / len(per_sample), 4) for k in KEYS}
    corpus = sacrebleu.corpus_bleu(list(predictions), [list(labels)]).score
    return {**means, "sacrebleu": round(corpus, 4)}
