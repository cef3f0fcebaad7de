"""Full fine-tuning: every parameter of the model trains, and the result is a complete transformers model folder."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from ..io.atomic import temp_dir
from .base import Method, MethodConfig, register, reject_adapter_keys


@dataclasses.dataclass
class FullConfig(MethodConfig):
    method = "full"

    def __post_init__(self) -> None:
        reject_adapter_keys(self, "every parameter trains. Remove it, or use freeze / lora to train a part.")


@register
class Full(Method):
    """Trains the base model's own weights, all of them; they are kept in float32 while training (as the trainer
    keeps every trainable tensor), so bf16 rounding never swallows small AdamW updates."""

    name = "full"
    config_class = FullConfig
    in_place = True
    output_kind = "model"
    writes_own_files = True

    def attach(self) -> None:
        self._upcast_from = None
        for p in self.model.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                self._upcast_from = p.dtype
        if self._upcast_from is not None:
            self.model.float()  # one dtype for the whole model: no casts at module boundaries
        for p in self.model.parameters():
            p.requires_grad_(True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter under its own name; a tied lm_head shares embed_tokens' tensor and appears once."""
        return dict(self.model.named_parameters())

    def notes(self) -> list[str]:
        n = sum(p.numel() for _, p in self.trainable_parameters())
        grad_bytes = sum(p.numel() * p.element_size() for _, p in self.trainable_parameters())
        lines = [f"Gradients: {grad_bytes / 2**20:,.1f} MiB (one per parameter: {n:,d} trainable, the whole model)"]
        if self._upcast_from is not None:
            lines.append(f"Full fine-tuning keeps the weights in float32 (upcast from {self._upcast_from}); the saved "
                         "model is float32 too (peftkit export can cast it).")
        return lines

    def save(self, directory: str | os.PathLike, base_model_name_or_path: str | None) -> None:
        """Write a complete transformers model folder (`AutoModelForCausalLM.from_pretrained(directory)` loads it).

        The folder may hold the run's logs and checkpoints, so it cannot be swapped whole: the model is written to a
        temporary folder inside it, the old config.json is removed first and the new one moved in last, so a crash in
        between leaves a folder that is not a model rather than a model with mixed weights.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(out, "full-model")
        try:
            self.model.save_pretrained(tmp, state_dict=_weights(self.model))
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
