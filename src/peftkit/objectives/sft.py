"""Supervised fine-tuning: next-token cross-entropy on the answer tokens (labels other than IGNORE_INDEX)."""

from __future__ import annotations

import torch
from torch import nn

from ..data.templates import IGNORE_INDEX
from ..varlen import attention_for
from .base import Batch, Objective, register
from .fused_head import fusable_head, hidden_instead_of_logits, linear_cross_entropy_sum


def token_loss_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over label tokens, number of label tokens).

    Logits are computed only at positions whose next token is a label (`logits_to_keep`): the vocabulary projection
    of prompt tokens is wasted work, a fifth of a small model's compute. In a padding-free batch (one row, see
    `SFTCollator`) these are exactly the label positions; in a padded batch, every column that has one.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    head = fusable_head(model)
    if head is not None:  # the head and the loss chunk by chunk: the logits are never all held (fused_head.py)
        with attention_for(model, batch), hidden_instead_of_logits(model, head):
            hidden = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        targets = targets[:, keep]
        loss = linear_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), head, targets.reshape(-1),
                                        IGNORE_INDEX)
        return loss, int((targets != IGNORE_INDEX).sum())
    with attention_for(model, batch):
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    targets = targets[:, keep]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def label_tokens(batch: Batch) -> int:
    """Label tokens of a batch: the positions a next-token loss is taken at."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@register
class Sft(Objective):
    """`stage: sft`: the mean token loss over every answer token of the step."""

    name = "sft"

    def units(self, batch: Batch) -> int:
        return label_tokens(batch)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return token_loss_sum(model, batch)[0]
