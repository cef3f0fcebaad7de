"""The Objective interface: what a training stage gives the one training loop.

An objective says how many units a batch's loss sums over and computes that sum; the loop divides a step's summed
loss by the step's total units, so gradient accumulation equals one large batch for every objective. It never sees
the loop: stepping, accumulation, checkpoints and logs belong to the Trainer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..settings import Setting

Batch = dict[str, torch.Tensor]

_REGISTRY: dict[str, type[Objective]] = {}


class Objective:
    """One training stage's loss. Subclasses set `name` (the config's `stage`) and implement `units` and `loss`."""

    name: ClassVar[str]
    # The YAML keys this stage reads (e.g. a preference loss's beta); config.py collects them into TrainConfig.
    yaml_keys: ClassVar[tuple[Setting, ...]] = ()

    def units(self, batch: Batch) -> int:
        """How many units (label tokens, pairs, ...) this batch's loss sums over."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The sum of the per-unit losses of `batch` (a scalar tensor with its graph)."""
        raise NotImplementedError


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available as `stage: <cls.name>`."""
    _REGISTRY[cls.name] = cls
    return cls


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    """The objective class for `stage: name`; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"stage '{name}' is not available; available stages: {', '.join(available_objectives())}.")
    return _REGISTRY[name]


def get_objective(name: str) -> Objective:
    return objective_class(name)()
