"""Checkpoints: adapter, optimizer, scheduler, RNG states, data position and config, written atomically, so that a
resumed run continues exactly where the interrupted one stopped."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..io import peft_format
from ..io.atomic import atomic_dir
from ..methods.base import Method

PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
BEST_NAME = "best_adapter_state.safetensors"
# The trained parameters, when the adapter file holds something derived from them (P-tuning's encoder output): resuming
# needs the parameters themselves.
TRAINED_NAME = "trained_parameters.safetensors"
CONFIG_NAME = "train_config.json"  # the TrainConfig of the run, in checkpoints and beside the final adapter


@dataclass
class TrainerState:
    """Where training is: enough to continue it exactly."""

    global_step: int = 0
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)


def read_train_config(folder: str | os.PathLike | None) -> dict[str, Any]:
    """The settings of the run that wrote `folder` (an adapter or checkpoint), or {} when it has no readable record."""
    path = Path(folder) / CONFIG_NAME if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | os.PathLike,
    state: TrainerState,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    base_model_name: str | None,
    save_total_limit: int | None = None,
    only_model: bool = False,
    best_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `output_dir/checkpoint-<step>` through a temporary folder, then prune the oldest beyond the limit.

    `only_model` (save_only_model) leaves out the optimizer, scheduler and RNG states: a third of the size for LoRA
    (AdamW keeps two moments per weight), but training cannot resume from it.
    """
    out = Path(output_dir)
    final = out / f"{PREFIX}{state.global_step}"
    with atomic_dir(final) as tmp:
        peft_format.save_adapter(method, tmp, base_model_name)
        trained = method.state_dict()
        if set(trained) != set(method.export_state()):
            save_file({k: t.detach().contiguous().cpu() for k, t in trained.items()}, tmp / TRAINED_NAME)
        if not only_model:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng_state.pt")
        if best_state is not None:  # load_best_model_at_end: the best adapter so far, so a resumed run still has it
            save_file({k: t.contiguous().cpu() for k, t in best_state.items()}, tmp / BEST_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=2))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    if save_total_limit:
        for old in list_checkpoints(out)[:-save_total_limit]:
            shutil.rmtree(old)
    return final


def load_best_state(path: Path) -> dict[str, torch.Tensor] | None:
    """The best adapter tensors saved with a checkpoint (internal keys), or None."""
    return load_file(path / BEST_NAME) if (path / BEST_NAME).is_file() else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = []
    for p in Path(output_dir).glob(f"{PREFIX}*"):
        m = re.fullmatch(rf"{PREFIX}(\d+)", p.name)
        if m and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(resume: str | bool | None, output_dir: str | os.PathLike) -> Path | None:
    """`resume_from_checkpoint`: a path, or True for the latest checkpoint in output_dir."""
    if not resume:
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"resume_from_checkpoint is true, but '{output_dir}' holds no checkpoint-* folder.")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"resume_from_checkpoint: '{path}' is not a checkpoint folder (no {STATE_NAME}).")
    return path


def load_checkpoint(path: Path, method: Method, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    """Restore everything `save_checkpoint` wrote; returns the trainer state to continue from."""
    if not (path / "optimizer.pt").is_file():
        raise ConfigError(f"'{path}' holds only the adapter (saved with save_only_model: true), not the optimizer and "
                          "RNG states needed to resume exactly. Start a new run from it with adapter_name_or_path, or "
                          "resume from a checkpoint saved without save_only_model.")
    if (path / TRAINED_NAME).is_file():
        method.load_state_dict(load_file(path / TRAINED_NAME))
    else:
        peft_format.load_weights(method, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    return TrainerState(**json.loads((path / STATE_NAME).read_text()))
