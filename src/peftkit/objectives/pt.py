"""`stage: pt`: continued pretraining, the next-token loss on every token of raw text (documents joined with EOS and
cut into cutoff_len blocks by the data pipeline; `packing: false` keeps one truncated document per example)."""

from __future__ import annotations

import math

from .base import register
from .sft import Sft


@register
class Pt(Sft):
    """`stage: pt`: SFT's token loss, on text whose every token is a label; evaluation adds perplexity."""

    name = "pt"
    data = "text"

    def eval_metrics(self, loss: float) -> dict[str, float]:
        return {"perplexity": math.exp(min(loss, 700.0))}
