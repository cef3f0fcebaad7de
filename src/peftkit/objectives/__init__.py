"""Training objectives, one module per stage; importing this package registers them all."""

from . import dpo, grpo, kd, kto, ppo, pt, rm  # noqa: F401 -- registers the stages
from .base import Batch, Objective, ReferenceSpec, available_objectives, get_objective, objective_class, register
from .sft import Sft, label_tokens, token_loss_sum

__all__ = ["Batch", "Objective", "ReferenceSpec", "Sft", "available_objectives", "get_objective", "label_tokens",
           "objective_class", "register", "token_loss_sum"]
