"""Learning-rate schedules by `TrainingArguments`' names, with transformers' formulas (tested equal to its
`get_scheduler`). Our own because importing `transformers.optimization` imports PEFT, and with it bitsandbytes, whose
start-up warnings about optional kernels would open every run that quantizes nothing."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _constant(step: int, *, warmup: int, total: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int, total: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int, num_cycles: float = 0.5) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))


def _cosine_with_restarts(step: int, *, warmup: int, total: int, num_cycles: int = 1) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def _polynomial(step: int, *, warmup: int, total: int, lr_init: float, lr_end: float = 1e-7,
                power: float = 1.0) -> float:
    """From the optimizer's learning rate down to `lr_end`; the factor is relative to the initial rate."""
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / (total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": _constant, "constant_with_warmup": _constant_with_warmup, "linear": _linear, "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts, "polynomial": _polynomial,
}
_KWARGS = {"cosine": {"num_cycles"}, "cosine_with_restarts": {"num_cycles"}, "polynomial": {"lr_end", "power"}}


def get_scheduler(name: str, optimizer: torch.optim.Optimizer, *, num_warmup_steps: int, num_training_steps: int,
                  scheduler_specific_kwargs: dict[str, Any] | None = None) -> LambdaLR:
    """`lr_scheduler_type` + `lr_scheduler_kwargs` -> a LambdaLR (its state saves and resumes as transformers' does)."""
    if name not in SCHEDULES:
        raise ConfigError(f"lr_scheduler_type '{name}' is not one of: {', '.join(SCHEDULES)}.")
    kwargs = dict(scheduler_specific_kwargs or {})
    unknown = set(kwargs) - _KWARGS.get(name, set())
    if unknown:
        allowed = ", ".join(sorted(_KWARGS.get(name, ()))) or "none"
        raise ConfigError(f"lr_scheduler_kwargs {sorted(unknown)} do not apply to lr_scheduler_type '{name}' "
                          f"(it takes: {allowed}).")
    if name == "polynomial":
        kwargs["lr_init"] = optimizer.defaults["lr"]
        if not kwargs["lr_init"] > kwargs.get("lr_end", 1e-7):
            raise ConfigError(f"lr_scheduler_kwargs lr_end ({kwargs.get('lr_end', 1e-7)}) must be below the "
                              f"learning_rate ({kwargs['lr_init']}).")
    factor = functools.partial(SCHEDULES[name], warmup=num_warmup_steps, total=num_training_steps, **kwargs)
    return LambdaLR(optimizer, factor)
