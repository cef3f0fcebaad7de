"""Per-sequence quantities of a batch of whole sequences: log-probabilities of their label tokens, last hidden states.

Preference stages compare sequences, not tokens. Their batches hold several sequences (chosen ones, then rejected
ones; or examples, then their mismatched pairs), either flattened padding-free into one row (`cu_seq_lens_q` marks
where each starts) or right-padded, one per row: everything here reads both layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.templates import IGNORE_INDEX
from ..varlen import attention_for
from .base import Batch
from .fused_head import fusable_head, hidden_instead_of_logits, linear_log_probs
from .teacher_cache import IDS, LOGPS

NOT_MODEL_INPUTS = ("labels", "kto_tag", IDS, LOGPS)  # the last two: kd's cached teacher top-k


def model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def sequence_count(batch: Batch) -> int:
    return len(batch["cu_seq_lens_q"]) - 1 if "cu_seq_lens_q" in batch else int(batch["input_ids"].shape[0])


def _segments(batch: Batch, positions: torch.Tensor) -> torch.Tensor:
    """The sequence each token position of a flattened row belongs to."""
    starts = batch["cu_seq_lens_q"][1:-1].to(positions.device)
    return torch.bucketize(positions, starts, right=True)


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of each sequence's label tokens [sequences], float32; their count [sequences]).

    Logits are computed only where a label follows (`logits_to_keep`), in float32 for the log-softmax.
    """
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    head = fusable_head(model)
    if head is not None:  # the head and the log-softmax chunk by chunk, no full logits held (fused_head.py)
        with attention_for(model, batch), hidden_instead_of_logits(model, head):
            hidden = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False).logits
        targets = targets[:, keep]
        token_logps = linear_log_probs(hidden.reshape(-1, hidden.shape[-1]), head, targets.reshape(-1),
                                       IGNORE_INDEX).view(targets.shape)
    else:
        with attention_for(model, batch):
            logits = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False).logits.float()
        targets = targets[:, keep]
        token_logps = -nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    counted = (targets != IGNORE_INDEX).float()
    if "cu_seq_lens_q" not in batch:
        return token_logps.sum(-1), counted.sum(-1)
    segments = _segments(batch, keep + 1)  # position p predicts the token at p + 1, which a sequence owns
    n = sequence_count(batch)
    sums = token_logps.new_zeros(n).index_add(0, segments, token_logps[0])
    counts = counted.new_zeros(n).index_add(0, segments, counted[0])
    return sums, counts


def last_hidden(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The final hidden state (what the LM head reads) at each sequence's last token: [sequences, hidden size]."""
    if "cu_seq_lens_q" in batch:
        last = (batch["cu_seq_lens_q"][1:] - 1).to(batch["input_ids"].device).long()
    else:
        last = batch["attention_mask"].sum(-1) - 1
    head = fusable_head(model)
    with attention_for(model, batch):
        if head is not None:
            with hidden_instead_of_logits(model, head):
                if "cu_seq_lens_q" in batch:
                    return model(**model_inputs(batch), logits_to_keep=last, use_cache=False).logits[0]
                hidden = model(**model_inputs(batch), use_cache=False).logits
        else:
            hidden = model(**model_inputs(batch), use_cache=False, output_hidden_states=True).hidden_states[-1]
    if "cu_seq_lens_q" in batch:
        return hidden[0, last]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
