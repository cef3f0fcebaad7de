"""Scoring text with a trained reward model (`stage: rm`): the base model, its adapter and its value head.

    rm = peftkit.RewardModel.load("saves/rm")
    rm(["plain text", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])  # -> floats

A conversation is rendered with the template the reward model was trained with, exactly as training rendered its
pairs; a string is scored as it is (tokenized with the tokenizer's own special tokens). The score is the value head
on the final hidden state of the last token, as in training.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from ..data import Conversation, SFTCollator, get_template
from ..data.formats import RowError, check_turns
from ..data.templates import encode
from ..errors import ConfigError
from ..io.run_config import read_train_config
from ..objectives.rm import load_value_head, model_hidden_size, scores
from ..tuned import TunedModel
from ..varlen import supports_padding_free

Text = str | Sequence[dict[str, str]]


class RewardModel:
    """A reward model ready to score: `RewardModel.load(adapter_dir)(texts)` -> one float per text."""

    def __init__(self, model: nn.Module, tokenizer: Any, head: nn.Linear, template: str | None = None,
                 cutoff_len: int = 4096, batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.head = model.eval(), tokenizer, head
        self.template = get_template(template, tokenizer)
        self.cutoff_len, self.batch_size = cutoff_len, batch_size
        self.collator = SFTCollator(tokenizer.pad_token_id, padding_free=supports_padding_free(model),
                                    mask_dtype=next(model.parameters()).dtype)

    @classmethod
    def load(cls, directory: str | os.PathLike, model_name_or_path: str | None = None, *,
             dtype: torch.dtype | str | None = None, trust_remote_code: bool = False) -> RewardModel:
        """The reward model saved in `directory` (a `stage: rm` run's output_dir), on the base model it was trained
        on (from its train_config.json) unless `model_name_or_path` names another."""
        from ..models import load_model_and_tokenizer

        saved = read_train_config(directory)
        base = model_name_or_path or saved.get("model_name_or_path")
        if not base:
            raise ConfigError(f"{directory} does not say which base model it was trained on (no train_config.json); "
                              "pass model_name_or_path.")
        model, tokenizer = load_model_and_tokenizer(base, dtype=dtype, trust_remote_code=trust_remote_code)
        head = load_value_head(directory, model_hidden_size(model), next(model.parameters()).device)
        tuned = TunedModel.load(model, directory) if os.path.isfile(os.path.join(directory, "adapter_config.json")) \
            else model
        return cls(tuned, tokenizer, head, saved.get("template"), saved.get("cutoff_len") or 4096)

    def _ids(self, text: Text) -> list[int]:
        if isinstance(text, str):
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
            return ids[-self.cutoff_len:]
        messages = [dict(m) for m in text]
        try:
            check_turns(messages)
        except RowError as e:
            raise ConfigError(f"A conversation to score must alternate user and assistant turns and end with the "
                              f"assistant's answer: {e}.") from None
        example, _ = encode(Conversation(messages=messages), self.template, self.tokenizer,
                            cutoff_len=self.cutoff_len, mask_history=True)  # rendered as training rendered pairs
        return example["input_ids"]

    @torch.no_grad()
    def __call__(self, texts: Sequence[Text] | Text) -> list[float]:
        """One score per text (a string, or a conversation as [{"role", "content"}, ...])."""
        if isinstance(texts, str) or (texts and isinstance(texts[0], dict)):
            texts = [texts]  # type: ignore[list-item]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            rows = [self._ids(t) for t in texts[i:i + self.batch_size]]
            batch = self.collator([{"input_ids": r, "labels": r} for r in rows])
            batch = {k: v.to(device) for k, v in batch.items()}
            out += scores(self.model, self.head, batch).tolist()
        return out
