"""Preview a dataset as training will see it: rows rendered by the chat template, the answer tokens marked, and how
long the rows are against `cutoff_len`."""

from __future__ import annotations

import dataclasses
import html
from typing import Any

from ..config import TrainConfig
from ..data import IGNORE_INDEX, get_template, load_conversations
from ..data.formats import RowError
from ..data.templates import encode
from ..models import load_tokenizer, resolve_model_path

_LONG = 1 << 30  # encode without cutting, to measure each row's full length


@dataclasses.dataclass
class Preview:
    rows: int
    lengths: list[int]
    cutoff_len: int
    html: str

    @property
    def over_cutoff(self) -> int:
        return sum(n > self.cutoff_len for n in self.lengths)


def preview_dataset(cfg: TrainConfig, shown_rows: int = 5) -> Preview:
    """The first `shown_rows` rows as HTML (answer tokens in <mark>) and every row's token count."""
    tokenizer = load_tokenizer(resolve_model_path(cfg.model_name_or_path), trust_remote_code=cfg.trust_remote_code)
    template = get_template(cfg.template, tokenizer, enable_thinking=cfg.enable_thinking)
    conversations, _ = load_conversations(cfg.dataset or [], cfg.dataset_dir, max_samples=cfg.max_samples,
                                          seed=cfg.seed)
    lengths, blocks = [], []
    for conv in conversations:
        try:
            example, _ = encode(conv, template, tokenizer, cutoff_len=_LONG, train_on_prompt=cfg.train_on_prompt,
                                mask_history=cfg.mask_history)
        except RowError:
            continue
        lengths.append(len(example["input_ids"]))
        if len(blocks) < shown_rows:
            blocks.append(_render(example, tokenizer, cfg.cutoff_len))
    body = "".join(f'<div class="pk-row"><pre>{b}</pre></div>' for b in blocks)
    return Preview(len(lengths), lengths, cfg.cutoff_len, f'<div id="pk-preview-rows">{body}</div>')


def _render(example: dict[str, Any], tokenizer: Any, cutoff_len: int) -> str:
    """Consecutive tokens of one kind decoded together; answers (trained on) marked, tokens past cutoff_len struck."""
    ids, labels = example["input_ids"], example["labels"]
    pieces, start = [], 0
    kind = _kind(labels, 0, cutoff_len)
    for i in range(1, len(ids) + 1):
        now = _kind(labels, i, cutoff_len) if i < len(ids) else None
        if now != kind:
            text = html.escape(tokenizer.decode(ids[start:i]))
            pieces.append({"answer": f"<mark>{text}</mark>", "cut": f"<s>{text}</s>"}.get(kind, text))
            start, kind = i, now
    return "".join(pieces)


def _kind(labels: list[int], i: int, cutoff_len: int) -> str:
    if i >= cutoff_len:
        return "cut"
    return "prompt" if labels[i] == IGNORE_INDEX else "answer"
