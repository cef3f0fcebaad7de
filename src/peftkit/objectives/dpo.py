"""`stage: dpo`: direct preference optimisation and its family, chosen by `pref_loss`.

Each pair's chosen and rejected answers run through the policy in one forward (the batch holds the chosen sequences
first, then the rejected ones). With log-probabilities summed over each answer's tokens, pi for the policy and r for
the reference, and delta = (pi_c - r_c) - (pi_r - r_r):

- sigmoid (DPO, Rafailov et al. 2023, eq. 7): -log sigmoid(beta delta); with `dpo_label_smoothing` e (cDPO):
  -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta);
- hinge (SLiC): max(0, 1 - beta delta);
- ipo (Azar et al. 2023, eq. 17), on per-token log-ratios as TRL computes it:
  ((pi_c - r_c) / n_c - (pi_r - r_r) / n_r - 1 / (2 beta))^2;
- kto_pair (TRL's paired KTO): 1 - sigmoid(beta ((pi_c - r_c) - KL_r)) and 1 - sigmoid(beta (KL_c - (pi_r - r_r))),
  averaged, with KL_c, KL_r the batch means of the log-ratios clamped at 0;
- orpo (Hong et al. 2024, eqs. 4-7; reference-free), on per-token means p = pi / n: -p_c + beta * -log sigmoid(
  log odds(p_c) - log odds(p_r)), log odds(p) = p - log(1 - exp(p));
- simpo (Meng et al. 2024, eq. 6; reference-free, length-normalised): -log sigmoid(beta (p_c - p_r) - simpo_gamma).

`pref_ftx` adds that weight times the chosen answer's mean token loss (-pi_c / n_c) to every pair's loss. Rewards are
beta (pi - r) (beta p for the reference-free losses); the logged metrics take TRL's names.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import Setting
from .base import Batch, Objective, ReferenceSpec, register
from .reference import REFERENCE_SETTINGS, reference_logps, separate_reference
from .sequences import sequence_count, sequence_logps

PREF_LOSSES = ("sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")


def preference_losses(loss_type: str, beta: float, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                      chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *, label_smoothing: float = 0.0,
                      simpo_gamma: float = 0.5, ftx: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss of each pair, chosen rewards, rejected rewards) from summed answer log-probs (see the module's doc)."""
    chosen_mean = policy_chosen / chosen_tokens.clamp(min=1)
    rejected_mean = policy_rejected / rejected_tokens.clamp(min=1)
    if loss_type in REFERENCE_FREE:
        if loss_type == "orpo":
            log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-torch.exp(chosen_mean))
                                                        - torch.log1p(-torch.exp(rejected_mean)))
            losses = -chosen_mean - beta * F.logsigmoid(log_odds)
        elif loss_type == "simpo":
            logits = (chosen_mean - rejected_mean) - simpo_gamma / beta
            losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                      - label_smoothing * F.logsigmoid(-beta * logits))
        else:
            raise ValueError(f"pref_loss '{loss_type}' is unknown; choose from {', '.join(PREF_LOSSES)}.")
        chosen_rewards, rejected_rewards = beta * chosen_mean.detach(), beta * rejected_mean.detach()
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"pref_loss '{loss_type}' needs the reference model's log-probabilities.")
        chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
        delta = chosen_ratio - rejected_ratio
        if loss_type == "sigmoid":
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":
            per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            losses = (per_token - 1 / (2 * beta)) ** 2
        elif loss_type == "kto_pair":
            chosen_kl = chosen_ratio.mean().clamp(min=0)
            rejected_kl = rejected_ratio.mean().clamp(min=0)
            losses = ((1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)))
                      + (1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio)))) / 2
        else:
            raise ValueError(f"pref_loss '{loss_type}' is unknown; choose from {', '.join(PREF_LOSSES)}.")
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    if ftx:
        losses = losses - ftx * chosen_mean
    return losses, chosen_rewards, rejected_rewards


@register
class Dpo(Objective):
    """`stage: dpo`: the pairwise preference loss `pref_loss`, summed over pairs (the unit)."""

    name = "dpo"
    data = "pairs"
    yaml_keys: ClassVar[tuple[Setting, ...]] = (
        *REFERENCE_SETTINGS,
        Setting("pref_loss", str, "sigmoid", "DPO's loss: sigmoid (DPO), hinge, ipo, kto_pair, orpo or simpo (the "
                "last two need no reference model).", "rlhf", PREF_LOSSES),
        Setting("dpo_label_smoothing", float, 0.0, "DPO: the share of preference labels assumed flipped (cDPO), in "
                "[0, 0.5).", "rlhf"),
        Setting("simpo_gamma", float, 0.5, "SimPO: the target reward margin gamma.", "rlhf"),
    )

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, ftx: float = 0.0, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5) -> None:
        super().__init__()
        if loss_type not in PREF_LOSSES:
            raise ValueError(f"pref_loss '{loss_type}' is unknown; choose from {', '.join(PREF_LOSSES)}.")
        self.loss_type, self.beta, self.ftx = loss_type, beta, ftx
        self.label_smoothing, self.simpo_gamma = label_smoothing, simpo_gamma

    @classmethod
    def from_config(cls, cfg: Any) -> Dpo:
        return cls(cfg.pref_loss, cfg.pref_beta, cfg.pref_ftx, cfg.dpo_label_smoothing, cfg.simpo_gamma)

    def uses_reference(self, cfg: Any = None) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def reference_model(self, cfg: Any, in_place: bool) -> ReferenceSpec | None:
        return separate_reference(cfg, in_place) if self.uses_reference() else None

    def units(self, batch: Batch) -> int:
        return sequence_count(batch) // 2

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logps, tokens = sequence_logps(model, batch)
        pairs = len(logps) // 2
        ref_c = ref_r = None
        if self.uses_reference():
            ref, _ = reference_logps(self.model, self.reference, batch)
            ref_c, ref_r = ref[:pairs], ref[pairs:]
        losses, chosen_rewards, rejected_rewards = preference_losses(
            self.loss_type, self.beta, logps[:pairs], logps[pairs:], ref_c, ref_r, tokens[:pairs], tokens[pairs:],
            label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma, ftx=self.ftx)
        used = logps.detach() / tokens.clamp(min=1) if self.loss_type in REFERENCE_FREE else logps.detach()
        self.record("rewards/chosen", chosen_rewards.sum(), pairs)
        self.record("rewards/rejected", rejected_rewards.sum(), pairs)
        self.record("rewards/accuracies", (chosen_rewards > rejected_rewards).float().sum(), pairs)
        self.record("rewards/margins", (chosen_rewards - rejected_rewards).sum(), pairs)
        self.record("logps/chosen", used[:pairs].sum(), pairs)
        self.record("logps/rejected", used[pairs:].sum(), pairs)
        return losses.sum()
