"""Full fine-tuning: every parameter of the model trains, and the result is a complete transformers model folder."""

from __future__ import annotations

import dataclasses
import os

import torch

from ..io.model_folder import save_model_folder
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
        """Write a complete transformers model folder (`AutoModelForCausalLM.from_pretrained(directory)` loads it)."""
        save_model_folder(self.model, directory)
