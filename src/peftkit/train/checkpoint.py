"""Checkpoints: adapter, optimizer, scheduler, RNG states, data position and config, written atomically, so that a
resumed run continues exactly where the interrupted one stopped."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..io import peft_format
from ..io.atomic import atomic_dir, remove_tree
from ..io.outputs import check_not_a_file, check_overwritable, clear_output
from ..io.run_config import write_train_config
from ..methods.base import Method

PREFIX = "checkpoint-"
# TrainConfig keys a resumed run may change without `resume_allow_changes`: where results, logs and checkpoints go, how
# often they are written, evaluation and generation. Every other key (data, method, learning rate, schedule, batch,
# seed, cutoff, precision, ...) changes what is trained, so a resume compares it with the checkpoint's run.
RESUME_NEUTRAL_KEYS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_allow_changes", "logging_steps",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "eval_strategy", "eval_steps",
    "per_device_eval_batch_size", "do_train", "do_eval", "do_predict", "plot_loss", "report_to",
    "dataloader_num_workers", "preprocessing_num_workers", "overwrite_cache", "gradient_checkpointing",
    "torch_compile", "trust_remote_code", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
    "do_sample",
    "export_dir", "export_size", "export_format", "export_gguf_type", "ollama_system", "infer_dtype", "export_device",
    "export_legacy_format", "export_quantization_bit", "export_quantization_dataset", "export_hub_model_id",
    "fsdp", "deepspeed", "ddp_timeout", "ddp_find_unused_parameters",  # the engine: same result, any number of ranks
    "optim",  # AdamW fused or looped: the same steps to rounding (the only optimizers; others fall back)
})
STATE_NAME = "trainer_state.json"
BEST_NAME = "best_adapter_state.safetensors"
# The trained parameters, when the adapter file holds something derived from them (P-tuning's encoder output): resuming
# needs the parameters themselves.
TRAINED_NAME = "trained_parameters.safetensors"
OBJECTIVE_NAME = "objective_state.safetensors"  # the training stage's own tensors (a reward model's value head)


@dataclass
class TrainerState:
    """Where training is: enough to continue it exactly."""

    global_step: int = 0
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed (of `world_size` x the batch size)
    rows_in_epoch: int | None = None  # examples of that epoch already consumed (None in older checkpoints)
    world_size: int = 1  # the processes that trained it
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None  # one per fresh run, kept across resumes: pruning never touches another run's checkpoints


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
    optimizer_state: dict[str, Any] | None,
    scheduler: Any,
    config: dict[str, Any],
    base_model_name: str | None,
    save_total_limit: int | None = None,
    best_state: dict[str, torch.Tensor] | None = None,
    objective_state: dict[str, torch.Tensor] | None = None,
    engine_state: Path | None = None,
) -> Path:
    """Write `output_dir/checkpoint-<step>` through a temporary folder, then prune the oldest beyond the limit.

    Without `optimizer_state` (save_only_model) the optimizer, scheduler and RNG states are left out: a third of the
    size for LoRA (AdamW keeps two moments per weight), but training cannot resume from it. `engine_state` is a folder
    the engine wrote (DeepSpeed's ZeRO shards), moved in as `deepspeed/`.
    """
    out = Path(output_dir)
    final = out / f"{PREFIX}{state.global_step}"
    with atomic_dir(final) as tmp:
        peft_format.save_adapter(method, tmp, base_model_name)
        trained = method.state_dict()
        if set(trained) != set(method.export_state()):
            save_file({k: t.detach().contiguous().cpu() for k, t in trained.items()}, tmp / TRAINED_NAME)
        if objective_state:
            save_file({k: t.detach().contiguous().cpu() for k, t in objective_state.items()}, tmp / OBJECTIVE_NAME)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng_state.pt")
        if engine_state is not None:
            shutil.move(engine_state, tmp / "deepspeed")
        if best_state is not None:  # load_best_model_at_end: the best adapter so far, so a resumed run still has it
            save_file({k: t.contiguous().cpu() for k, t in best_state.items()}, tmp / BEST_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=2))
        write_train_config(tmp, config)
    if save_total_limit:
        mine = [p for p in list_checkpoints(out) if _run_id(p) == state.run_id]  # sorted by step
        for old in mine[:-save_total_limit]:
            remove_tree(old)
    return final


def _run_id(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / STATE_NAME).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


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


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, resume: str | bool | None) -> None:
    """Refuse, before any work: a resume without its checkpoint; a fresh run into a folder holding an earlier run (its
    adapter, model or checkpoints, which would mix with this run's) unless `overwrite`; an overwrite of a folder that is
    not peftkit's."""
    out = check_not_a_file(output_dir, "output_dir")
    if resume:
        resolve_checkpoint(resume, out)
        return
    if not out.is_dir():
        return
    if overwrite:
        check_overwritable(out, "output_dir")
        return
    earlier = [name for name in (peft_format.WEIGHTS_NAME, "config.json") if (out / name).exists()]
    earlier += [p.name for p in list_checkpoints(out)][-1:]
    if earlier:
        raise ConfigError(f"output_dir '{out}' holds an earlier run ({earlier[0]}); set overwrite_output_dir: true to "
                          "replace it, resume_from_checkpoint: true to continue it, or choose another output_dir.")


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool, resume: str | bool | None) -> None:
    """A fresh run's folder: `check_output_dir`, then the earlier run cleared when overwriting (a resume keeps it)."""
    if resume:
        check_not_a_file(output_dir, "output_dir")
        return
    check_output_dir(output_dir, overwrite, resume)
    if overwrite:
        clear_output(output_dir, "output_dir")


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


def read_state(path: Path) -> TrainerState:
    """The trainer state saved in a checkpoint; a damaged one is refused with the way out."""
    try:
        return TrainerState(**json.loads((path / STATE_NAME).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise _damaged(path, STATE_NAME, e) from None


def _damaged(path: Path, name: str, error: BaseException) -> ConfigError:
    earlier = [p for p in list_checkpoints(path.parent) if _step(p) < _step(path)]
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    way_out = f"resume from the one before it (resume_from_checkpoint={earlier[-1]}), or " if earlier else ""
    return ConfigError(f"Checkpoint '{path}' is damaged: {name} cannot be read ({reason}). Delete it and "
                       f"{way_out}start a new run with overwrite_output_dir: true.")


def _step(path: Path) -> int:
    m = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(m.group(1)) if m else -1


def check_resume(path: Path, state: TrainerState, total_steps: int, saved: dict[str, Any], current: dict[str, Any],
                 allow_changes: bool) -> None:
    """Refuse a resume that would not continue the checkpoint's run: nothing left to train, or settings that change
    the result (data, method, learning rate, schedule, batch, seed, ...) differ, unless `allow_changes`."""
    if state.global_step >= total_steps:
        raise ConfigError(f"Checkpoint '{path}' is at step {state.global_step}, and this run has {total_steps} steps "
                          "in all: there is nothing left to train. Raise max_steps or num_train_epochs to train "
                          "further (with resume_allow_changes: true), or start a new run.")
    current = json.loads(json.dumps(current, default=str))  # the form the saved config took
    changed = [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in sorted(saved.keys() & current.keys())
               if key not in RESUME_NEUTRAL_KEYS and saved[key] != current[key]]
    if not changed:
        return
    listing = "; ".join(changed)
    if not allow_changes:
        raise ConfigError(f"Resuming from '{path}' with settings that differ from its run: {listing}. They change "
                          "what is trained, so the result would be neither run. Restore them, or set "
                          "resume_allow_changes: true to resume with the new settings anyway.")
    warnings.warn(f"Resuming from '{path}' with changed settings (resume_allow_changes): {listing}.", stacklevel=3)


def load_objective_state(path: Path) -> dict[str, torch.Tensor]:
    """The training stage's own tensors saved in a checkpoint (none for most stages)."""
    try:
        return load_file(path / OBJECTIVE_NAME) if (path / OBJECTIVE_NAME).is_file() else {}
    except (SafetensorError, OSError) as e:
        raise _damaged(path, OBJECTIVE_NAME, e) from None


def load_trained(path: Path, method: Method) -> None:
    """Restore the trained tensors `save_checkpoint` wrote (`read_state` gives the trainer state, and
    `load_training_state` the optimizer's)."""
    if not (path / "optimizer.pt").is_file():
        raise ConfigError(f"'{path}' holds only the adapter (saved with save_only_model: true), not the optimizer and "
                          "RNG states needed to resume exactly. Start a new run from it with adapter_name_or_path, or "
                          "resume from a checkpoint saved without save_only_model.")
    if (path / TRAINED_NAME).is_file():
        try:
            method.load_state_dict(load_file(path / TRAINED_NAME))
        except (OSError, SafetensorError) as e:
            raise _damaged(path, TRAINED_NAME, e) from None
    else:
        peft_format.load_weights(method, path)  # a damaged adapter file gets its own message there


def load_training_state(path: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                        load_optimizer: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Restore the optimizer (through `load_optimizer` when given: FSDP's), scheduler and RNG states."""
    restore = {"optimizer.pt": load_optimizer or optimizer.load_state_dict, "scheduler.pt": scheduler.load_state_dict,
               "rng_state.pt": _set_rng_state}
    for name, apply in restore.items():
        try:
            apply(torch.load(path / name, weights_only=False))
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise _damaged(path, name, e) from None
