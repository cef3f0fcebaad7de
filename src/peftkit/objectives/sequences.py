"""Per-sequence quantities of a batch of whole sequences: log-probabilities of their label tokens, last hidden states.

Preference stages compare sequences, not tokens. Their batches hold several sequences (chosen ones, then rejected
ones; or examples, then their mismatched pairs), either flattened padding-free into one row (`cu_seq_lens_q` marks
where each starts) or right-padded, one per row: everything here reads both layouts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..data.templates import IGNORE_INDEX
from ..varlen import attention_for
from .base import Batch
from .fused_head import fusable_head, hidden_instead_of_logits, linear_log_probs
from .teacher_cache import IDS, LOGPS

# A rollout's per-sequence and per-token fields (ppo, grpo: rollout.py), laid out like kd's cached fields.
ROLLOUT_FIELDS = ("advantages", "old_logps", "ref_logps", "old_values", "returns")
NOT_MODEL_INPUTS = ("labels", "kto_tag", IDS, LOGPS, *ROLLOUT_FIELDS)  # IDS, LOGPS: kd's cached teacher top-k


def model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def sequence_count(batch: Batch) -> int:
    return len(batch["cu_seq_lens_q"]) - 1 if "cu_seq_lens_q" in batch else int(batch["input_ids"].shape[0])


def _segments(batch: Batch, positions: torch.Tensor) -> torch.Tensor:
    """The sequence each token position of a flattened row belongs to."""
    starts = batch["cu_seq_lens_q"][1:-1].to(positions.device)
    return torch.bucketize(positions, starts, right=True)


@dataclasses.dataclass
class TokenOutputs:
    """Per label token of a batch, sequence by sequence and in order within each (the order rollout fields use)."""

    logps: torch.Tensor  # [tokens] float32, with the graph
    sequence: torch.Tensor  # [tokens] long: the sequence each token belongs to
    count: int  # the batch's sequences
    values: torch.Tensor | None = None  # [tokens] a value head on the hidden state that predicts the token
    entropy: torch.Tensor | None = None  # [tokens] the predicted distribution's entropy, no graph


def token_outputs(model: nn.Module, batch: Batch, value_head: nn.Module | None = None,
                 entropy: bool = False) -> TokenOutputs:
    """The log-probability of each label token (and optionally a value head's output and the entropy at the position
    that predicts it). Logits are computed only where a label follows (`logits_to_keep`), softmax in float32."""
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    targets = targets[:, keep]
    head = fusable_head(model)
    hidden = ent = None
    if head is not None:  # the head and the log-softmax chunk by chunk, no full logits held (fused_head.py)
        with attention_for(model, batch), hidden_instead_of_logits(model, head):
            hidden = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False).logits
        ent = torch.empty(targets.numel(), device=hidden.device) if entropy else None
        token_logps = linear_log_probs(hidden.reshape(-1, hidden.shape[-1]), head, targets.reshape(-1),
                                       IGNORE_INDEX, entropy_out=ent).view(targets.shape)
        ent = ent.view(targets.shape) if ent is not None else None
    else:
        with attention_for(model, batch):
            out = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False,
                        output_hidden_states=value_head is not None)
        logits = out.logits.float()
        token_logps = -nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
        if entropy:
            with torch.no_grad():
                logp = torch.log_softmax(logits, dim=-1)
                ent = -(logp.exp() * logp).sum(-1)
        if value_head is not None:
            hidden = out.hidden_states[-1][:, keep]
    counted = targets != IGNORE_INDEX
    values = value_head(hidden.float()).squeeze(-1) if value_head is not None else None
    if "cu_seq_lens_q" in batch:
        positions = keep + 1  # position p predicts the token at p + 1, which a sequence owns
        sequence = _segments(batch, positions)[counted[0]]
    else:
        sequence = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[counted]
    return TokenOutputs(token_logps[counted], sequence, sequence_count(batch),
                       values[counted] if values is not None else None, ent[counted] if ent is not None else None)


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of each sequence's label tokens [sequences], float32; their count [sequences])."""
    tokens = token_outputs(model, batch)
    sums = tokens.logps.new_zeros(tokens.count).index_add(0, tokens.sequence, tokens.logps)
    counts = tokens.logps.new_zeros(tokens.count).index_add(0, tokens.sequence, torch.ones_like(tokens.logps))
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
