"""Progressive shrinking (`stage: kd` with `shrink_target_layers`): the student starts as a copy of the teacher and,
at each scheduled step, loses its least important remaining decoder layer, distilling from the full teacher all the
while, until `shrink_target_layers` remain. The result is an ordinary, smaller transformers model.

Importance is the block influence of ShortGPT (Men et al. 2024, eq. 1): BI_i = 1 - E_t[cos(x_t^i, x_t^{i+1})], one
minus the mean cosine similarity between a layer's input and output hidden states over the tokens of a calibration
batch (the step's own training micro-batches); the layer that changes its input least goes. `shrink_criterion: last`
removes the deepest remaining layer instead. A removed layer's parameters leave the model and the optimizer; the
config's layer count (and per-layer `layer_types`) follow, and the remaining layers are renumbered so the KV cache
indexes them right.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..models import layer_stack
from ..settings import Setting
from ..varlen import attention_for
from .base import Batch
from .sequences import model_inputs

CRITERIA = ("block_influence", "last")
SHRINK_SETTINGS = (
    Setting("shrink_target_layers", int | None, None, "kd: progressive shrinking: the student (a copy of the teacher "
            "by default) loses decoder layers during training until this many remain; the result is saved as a model "
            "folder with that many layers.", "rlhf"),
    Setting("shrink_steps", list | None, None, "kd: the steps after which layers are removed (spread evenly over "
            "them, the last reaching shrink_target_layers).", "rlhf"),
    Setting("shrink_every", int | None, None, "kd: remove one layer every k steps (instead of shrink_steps).", "rlhf"),
    Setting("shrink_criterion", str, "block_influence", "kd: which layer goes: block_influence (the one that changes "
            "its input least, ShortGPT) or last.", "rlhf", CRITERIA),
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (`models.layer_stack`)."""
    found = layer_stack(model)
    if found is None:
        raise ConfigError(f"Progressive shrinking found no list of decoder layers in {type(model).__name__}; it "
                          "removes layers from a transformers model's decoder stack (model.layers, transformer.h).")
    return found[1]


def remove_layer(model: nn.Module, position: int) -> list[nn.Parameter]:
    """Remove decoder layer `position` from `model` (a transformers model) and return its parameters."""
    layers = decoder_layers(model)
    gone = layers[position]
    del layers[position]
    config = model.config
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i != position]
    for index, layer in enumerate(layers):  # the KV cache is indexed by layer_idx
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    return list(gone.parameters())


@torch.no_grad()
def block_influence(model: nn.Module, layers: nn.ModuleList, batches: Sequence[Batch]) -> torch.Tensor:
    """BI of each layer [layers]: 1 - the mean cosine similarity of its input and output hidden states over the
    batches' real tokens (`model`: what runs the forward, adapters included)."""
    sums = torch.zeros(len(layers))
    count = 0
    mask: torch.Tensor | None = None

    def hook(index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[index] += float(cos[mask].sum()) if mask is not None else float(cos.sum())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            attention = batch.get("attention_mask")
            mask = attention.bool() if attention is not None and attention.dim() == 2 else None
            count += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            with attention_for(model, batch):
                model(**model_inputs(batch), logits_to_keep=1, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return 1 - sums / max(count, 1)


class Shrinker:
    """The schedule and the bookkeeping of progressive shrinking: which layers went, in which order (checkpointed,
    so a resumed run removes the same ones before loading its weights)."""

    def __init__(self, target: int, steps: Sequence[Any] | None, every: int | None, criterion: str) -> None:
        if criterion not in CRITERIA:
            raise ConfigError(f"shrink_criterion '{criterion}' is unknown; choose from {', '.join(CRITERIA)}.")
        if (steps is None) == (every is None):
            raise ConfigError("shrink_target_layers needs a schedule: shrink_every: k (one layer every k steps) or "
                              "shrink_steps: [s1, s2, ...], not both.")
        try:
            self.steps = [int(s) for s in steps] if steps is not None else None
        except ValueError:
            raise ConfigError(f"shrink_steps must be step numbers, got {steps!r}.") from None
        if self.steps is not None and (not self.steps or self.steps != sorted(set(self.steps)) or self.steps[0] < 1):
            raise ConfigError(f"shrink_steps must be increasing step numbers >= 1, got {steps!r}.")
        if every is not None and every < 1:
            raise ConfigError(f"shrink_every must be at least 1, got {every}.")
        self.target, self.every, self.criterion = target, every, criterion
        self.original: int = 0  # the layer count before any removal
        self.kept: list[int] = []  # original indices of the layers still there, in order
        self.removed: list[int] = []  # original indices, in the order they went

    def bind(self, model: nn.Module) -> None:
        """Check the target against the model's layer count (before any work)."""
        self.original = len(decoder_layers(model))
        if not 1 <= self.target < self.original:
            raise ConfigError(f"shrink_target_layers must be in [1, {self.original - 1}] for this model's "
                              f"{self.original} decoder layers, got {self.target}.")
        self.kept = list(range(self.original))

    def schedule(self) -> dict[int, int]:
        """step -> the layer count after that step's removals."""
        removals = self.original - self.target
        steps = self.steps or [self.every * (i + 1) for i in range(removals)]
        return {s: self.original - removals * (i + 1) // len(steps) for i, s in enumerate(steps)}

    def check_run(self, total_steps: int) -> None:
        last = max(self.schedule())
        if last > total_steps:
            raise ConfigError(f"Progressive shrinking removes its last layer after step {last}, but the run has "
                              f"{total_steps} steps: train longer, or remove layers sooner (shrink_every, "
                              "shrink_steps).")

    def step(self, step: int, model: nn.Module, runner: nn.Module, batches: Sequence[Batch]) -> list[nn.Parameter]:
        """Remove the layers due after `step` (`runner`: the model with its adapters, for block influence)."""
        due = len(self.kept) - self.schedule().get(step, len(self.kept))
        removed: list[nn.Parameter] = []
        for _ in range(due):
            if self.criterion == "last":
                position = len(self.kept) - 1
            else:
                position = int(block_influence(runner, decoder_layers(model), batches).argmin())
            removed += remove_layer(model, position)
            self.removed.append(self.kept.pop(position))
        return removed

    def replay(self, model: nn.Module, removed: list[int]) -> None:
        """Remove the layers a checkpoint's run had removed, in its order."""
        for original in removed:
            position = self.kept.index(original)
            remove_layer(model, position)
            self.removed.append(self.kept.pop(position))
