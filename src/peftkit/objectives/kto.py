"""`stage: kto`: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on answers tagged desirable or undesirable.

With r = log pi(y|x) - log ref(y|x) summed over the answer's tokens, and z the reference point, an estimate of
KL(pi || ref) from mismatched pairs (each prompt followed by another example's answer; eq. 7's z_0):
  desirable:   w_d (1 - sigmoid(beta (r - z)))
  undesirable: w_u (1 - sigmoid(beta (z - r)))
z = max(0, mean over the batch of the mismatched pairs' r), without gradient, as TRL computes it. The unit is an
example: a step's loss is the mean over its examples. `pref_ftx` adds that weight times a desirable answer's mean
token loss.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..settings import Setting
from .base import Batch, Objective, ReferenceSpec, register
from .reference import REFERENCE_SETTINGS, reference_logps, separate_reference
from .sequences import sequence_count, sequence_logps


def kto_losses(beta: float, policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of each example, its reward beta r) from summed answer log-probs and the reference point `kl`."""
    ratio = policy - reference
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach()


@register
class Kto(Objective):
    """`stage: kto`: the KTO loss summed over examples (the unit); each batch also holds the mismatched pairs."""

    name = "kto"
    data = "kto"
    yaml_keys: ClassVar[tuple[Setting, ...]] = (
        *REFERENCE_SETTINGS,
        Setting("kto_chosen_weight", float, 1.0, "KTO: the weight of desirable examples' losses.", "rlhf"),
        Setting("kto_rejected_weight", float, 1.0, "KTO: the weight of undesirable examples' losses.", "rlhf"),
    )

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 ftx: float = 0.0) -> None:
        super().__init__()
        self.beta, self.desirable_weight, self.undesirable_weight, self.ftx = (
            beta, desirable_weight, undesirable_weight, ftx)

    @classmethod
    def from_config(cls, cfg: Any) -> Kto:
        return cls(cfg.pref_beta, cfg.kto_chosen_weight, cfg.kto_rejected_weight, cfg.pref_ftx)

    def uses_reference(self, cfg: Any = None) -> bool:
        return True

    def reference_model(self, cfg: Any, in_place: bool) -> ReferenceSpec | None:
        return separate_reference(cfg, in_place) if self.uses_reference() else None

    def units(self, batch: Batch) -> int:
        return sequence_count(batch) // 2

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logps, tokens = sequence_logps(model, batch)  # the examples, then their mismatched pairs
        n = len(logps) // 2
        ref, _ = reference_logps(self.model, self.reference, batch)
        kl = (logps[n:].detach() - ref[n:]).mean().clamp(min=0)
        desirable = batch["kto_tag"].bool().to(logps.device)
        losses, rewards = kto_losses(self.beta, logps[:n], ref[:n], desirable, kl, self.desirable_weight,
                                     self.undesirable_weight)
        if self.ftx:
            losses = losses - self.ftx * desirable * logps[:n] / tokens[:n].clamp(min=1)
        chosen, rejected = int(desirable.sum()), int((~desirable).sum())
        self.record("kl", kl * n, n)
        if chosen:
            self.record("rewards/chosen", rewards[desirable].sum(), chosen)
            self.record("logps/chosen", logps[:n].detach()[desirable].sum(), chosen)
        if rejected:
            self.record("rewards/rejected", rewards[~desirable].sum(), rejected)
            self.record("logps/rejected", logps[:n].detach()[~desirable].sum(), rejected)
        return losses.sum()

    def finish_metrics(self, means: dict[str, float]) -> dict[str, float]:
        if "rewards/chosen" in means and "rewards/rejected" in means:
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        return means
