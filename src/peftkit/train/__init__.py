"""Training: the loop, checkpoints and resume, precision choice, schedules, loss plots."""

from ..objectives import token_loss_sum
from .run import run_sft
from .trainer import Trainer, optimizer_step

__all__ = ["Trainer", "optimizer_step", "run_sft", "token_loss_sum"]
