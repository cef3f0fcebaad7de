"""Training: the loop, checkpoints and resume, precision choice, loss plots."""

from .run import run_sft
from .trainer import Trainer, token_loss_sum

__all__ = ["Trainer", "run_sft", "token_loss_sum"]
