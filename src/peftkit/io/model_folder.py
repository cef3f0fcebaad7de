"""A complete transformers model folder, written so that a crash never leaves a model with mixed weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .atomic import temp_dir


def save_model_folder(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write `model` (a transformers model) to `directory`: `AutoModelForCausalLM.from_pretrained(directory)` loads it.

    The folder may hold the run's logs and checkpoints, so it cannot be swapped whole: the model is written to a
    temporary folder inside it, the old config.json is removed first and the new one moved in last, so a crash in
    between leaves a folder that is not a model rather than a model with mixed weights.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out, "full-model")
    try:
        model.save_pretrained(tmp, state_dict=_weights(model))
        written = {p.name for p in tmp.iterdir()}
        (out / "config.json").unlink(missing_ok=True)
        stale = [p for p in out.glob("model*.safetensors*") if p.name not in written]
        for p in stale:
            p.unlink(missing_ok=True)
        for name in sorted(written - {"config.json"}) + ["config.json"]:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model folder holds, read from the parameters and persistent buffers themselves: under FSDP (whole
    for saving) `state_dict()` would hand back each rank's shard."""
    out = {name: p.detach() for name, p in model.named_parameters()}
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buffer
    return out
