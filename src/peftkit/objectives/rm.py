"""`stage: rm`: a reward model, a scalar value head on the final hidden state of each sequence's last token, trained
with the pairwise loss -log sigmoid(r_chosen - r_rejected) (the Bradley-Terry model, as in InstructGPT).

The head is the objective's own tensor: optimized with the adapter, kept in checkpoints, and saved beside the adapter
as `value_head.safetensors` with TRL's / LLaMA-Factory's names (`v_head.summary.weight`, `v_head.summary.bias`), so
the adapter itself stays an ordinary PEFT adapter. `peftkit.RewardModel` loads both to score text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..io.atomic import atomic_write
from .base import Batch, Objective, register
from .sequences import last_hidden, sequence_count

VALUE_HEAD_NAME = "value_head.safetensors"
_KEYS = {"weight": "v_head.summary.weight", "bias": "v_head.summary.bias"}


def new_value_head(hidden_size: int, device: torch.device | str = "cpu", zero: bool = False) -> nn.Linear:
    """A float32 linear layer from the hidden state to one score; `zero`: every score starts at 0 (the loss at ln 2,
    no pair preferred), so the first steps learn the head from the model's features instead of undoing a random
    head's opinions (on dpo_en_demo with smollm2: held-out accuracy 0.65 after 60 steps, 0.45 from a random head)."""
    head = nn.Linear(hidden_size, 1, dtype=torch.float32, device=device)
    if zero:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return head


def model_hidden_size(model: nn.Module) -> int:
    """The width of the model's final hidden states, which the value head reads."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise ConfigError(f"A reward model needs the model's hidden size; {type(config).__name__} names none.")
    return size


def load_value_head(directory: str | Path, hidden_size: int, device: torch.device | str = "cpu") -> nn.Linear:
    path = Path(directory) / VALUE_HEAD_NAME
    if not path.is_file():
        raise ConfigError(f"{directory} has no {VALUE_HEAD_NAME}: it is not a reward model (train one with stage: rm).")
    state = load_file(str(path))
    head = new_value_head(hidden_size, device)
    if tuple(state[_KEYS["weight"]].shape) != tuple(head.weight.shape):
        raise ConfigError(f"{path} scores hidden states of size {state[_KEYS['weight']].shape[-1]}, but this model's "
                          f"are {hidden_size}: load it with the base model it was trained on.")
    with torch.no_grad():
        head.weight.copy_(state[_KEYS["weight"]])
        head.bias.copy_(state[_KEYS["bias"]])
    return head


def head_parameters(head: nn.Linear | None) -> list[tuple[str, nn.Parameter]]:
    """A value head's parameters under their saved names (none before the head exists)."""
    return [] if head is None else [(_KEYS[n], p) for n, p in head.named_parameters()]


def load_head_state(head: nn.Linear | None, state: dict[str, Any], stage: str) -> None:
    """Copy a checkpointed value head (`head_parameters`' names) into `head`."""
    if head is None:
        raise RuntimeError(f"attach() the {stage} objective to its model before loading its value head.")
    with torch.no_grad():
        for n, p in head.named_parameters():
            p.copy_(state[_KEYS[n]])


def save_value_head(head: nn.Linear | None, output_dir: Path) -> None:
    """Write `head` beside the adapter as value_head.safetensors, TRL's / LLaMA-Factory's names."""
    if head is None:
        return
    state = {k: p.detach().contiguous().cpu() for k, p in head_parameters(head)}
    atomic_write(Path(output_dir) / VALUE_HEAD_NAME, lambda tmp: save_file(state, tmp))


def scores(model: nn.Module, head: nn.Linear, batch: Batch) -> torch.Tensor:
    """The value head's score of each sequence in `batch` [sequences], float32."""
    return head(last_hidden(model, batch).float()).squeeze(-1)


@register
class Rm(Objective):
    """`stage: rm`: the pairwise loss over (chosen, rejected) pairs (the unit); logs accuracy and the rewards."""

    name = "rm"
    data = "pairs"

    def __init__(self) -> None:
        super().__init__()
        self.head: nn.Linear | None = None

    def attach(self, model: nn.Module, reference: nn.Module | None = None) -> None:
        super().attach(model, reference)
        if self.head is None:
            self.head = new_value_head(model_hidden_size(model), next(model.parameters()).device, zero=True)

    def units(self, batch: Batch) -> int:
        return sequence_count(batch) // 2

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("The rm objective was not attached to a model; the Trainer calls attach() first.")
        rewards = scores(model, self.head, batch)
        pairs = len(rewards) // 2
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        losses = -F.logsigmoid(chosen - rejected)
        self.record("rewards/chosen", chosen.detach().sum(), pairs)
        self.record("rewards/rejected", rejected.detach().sum(), pairs)
        self.record("rewards/accuracies", (chosen > rejected).float().sum(), pairs)
        self.record("rewards/margins", (chosen - rejected).detach().sum(), pairs)
        return losses.sum()

    def finish_metrics(self, means: dict[str, float]) -> dict[str, float]:
        if "rewards/accuracies" in means:  # LLaMA-Factory's name for the pairwise accuracy
            means["accuracy"] = means["rewards/accuracies"]
        return means

    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        return head_parameters(self.head)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in head_parameters(self.head)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_head_state(self.head, state, self.name)

    def save(self, output_dir: Path) -> None:
        save_value_head(self.head, output_dir)
