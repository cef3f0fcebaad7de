"""LoRA-drop (Zhou et al. 2024, "LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation", Sec. 3).

Two phases, both inside one `Trainer.train()`:
  1. Selection (`prepare`): LoRA on every target layer trains briefly on a random sample D_s of the training data;
     then each transformer layer i gets an importance g_i = mean over the sample tokens x of sum_m ||ΔW_m x||², with
     ΔW_m x = s B_m A_m x the output of its LoRA modules m. Layers are ranked by g_i / sum_j g_j and kept, most
     important first, until their cumulative share reaches the threshold T.
  2. Training (the normal loop): kept layers have their own LoRA; all dropped layers share ONE LoRA per module type
     (one q_proj LoRA, one v_proj LoRA, ...), i.e. the very same nn.Parameter objects, so the optimizer sees each
     shared tensor once.

Phase 2 starts from a fresh LoRA, as the paper trains the pruned LoRA from scratch: every adapter tensor is reset to
the value `attach` gave it (A Kaiming-uniform, B zero), so phase 1 only chooses layers. Saving writes the shared
tensors into each dropped layer's keys: the file is plain PEFT LoRA that PEFT, vLLM and peftkit load as such.
The paper samples D_s stratified by class; instruction data has no classes, so D_s is a seeded uniform sample.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, PeftkitError
from ..io.atomic import atomic_write
from ..settings import Setting
from .base import TrainingContext, register, trainable_report
from .lora import Lora, LoraConfig, LoraEmbedding, LoraLayer

RECORD_NAME = "lora_drop.json"


@dataclasses.dataclass
class LoraDropConfig(LoraConfig):
    lora_drop_sample_ratio: float = 0.1
    lora_drop_threshold: float = 0.9
    lora_drop_steps: int | None = None

    method = "lora_drop"
    yaml_keys = (
        *LoraConfig.yaml_keys,
        Setting("lora_drop_sample_ratio", float, 0.1, "Share of the training data that the selection phase trains on."),
        Setting("lora_drop_threshold", float, 0.9, "Keep the most important layers until they hold this share of the "
                "total importance; the others share one LoRA."),
        Setting("lora_drop_steps", int | None, None, "Steps of the selection phase. Empty: one pass over the sample."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.lora_drop_sample_ratio <= 1:
            raise ConfigError(f"lora_drop_sample_ratio must be in (0, 1] (the share of the training data used to "
                              f"select layers, e.g. 0.1), got {self.lora_drop_sample_ratio!r}.")
        if not 0 < self.lora_drop_threshold <= 1:
            raise ConfigError(f"lora_drop_threshold must be in (0, 1] (the share of total importance the kept layers "
                              f"must reach, e.g. 0.9), got {self.lora_drop_threshold!r}.")
        steps = self.lora_drop_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ConfigError(f"lora_drop_steps must be an integer >= 1, or null for one pass over the sample; "
                              f"got {steps!r}.")
        if self.use_dora:
            raise ConfigError("use_dora cannot be combined with finetuning_type lora_drop: a DoRA magnitude vector "
                              "belongs to one layer's weight and cannot be shared across layers. Set use_dora: false, "
                              "or use finetuning_type: lora.")


def select_layers(importance: dict[int, float], threshold: float) -> list[int]:
    """The most important layers, in order, until their share of the total reaches `threshold` (ascending ids).

    A threshold of 1 keeps every layer; so does an all-zero importance (nothing to rank by).
    """
    total = sum(importance.values())
    if threshold >= 1 or total <= 0:
        return sorted(importance)
    kept: list[int] = []
    share = 0.0
    for layer in sorted(importance, key=lambda i: (-importance[i], i)):
        kept.append(layer)
        share += importance[layer] / total
        if share >= threshold:
            break
    return sorted(kept)


def _layer_of(path: str, layers_pattern: list[str] | str | None) -> tuple[int, str] | None:
    """`model.layers.3.self_attn.q_proj` -> (3, "self_attn.q_proj"); None outside a numbered layer stack.

    Matches the block index as `base.find_targets` does for `layers_to_transform`.
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
    return (int(match.group("idx")), path[match.end():]) if match else None


def _token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, seq] True at real (non-padding) tokens: a 2-D mask as is, a packed 4-D mask's diagonal, else all."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    if mask.dim() == 4:
        diag = mask[:, 0].diagonal(dim1=-2, dim2=-1)
        return diag if mask.dtype == torch.bool else diag == 0
    return mask.bool()


def _lora_output(layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    """ΔW x = s B A x of adapter `name` (no dropout), in fp32."""
    A, B, s = layer.lora_A[name].float(), layer.lora_B[name].float(), layer.scaling[name]
    if isinstance(layer, LoraEmbedding):
        return F.embedding(x, A.T, layer.base_layer.padding_idx) @ B.T * s
    return F.linear(F.linear(x.float(), A), B) * s


@register
class LoraDrop(Lora):
    """LoRA whose low-importance layers share one LoRA per module type, chosen by a short training on a sample."""

    name = "lora_drop"
    config_class = LoraDropConfig
    config: LoraDropConfig

    def __init__(self, model: nn.Module, config: LoraDropConfig, adapter_name: str) -> None:
        super().__init__(model, config, adapter_name)
        self.kept_layers: list[int] | None = None  # set by the selection; None until then
        self.dropped_layers: list[int] = []
        self.importance: dict[int, float] = {}
        self.shared_modules: list[str] = []  # module names (within a layer) whose LoRA the dropped layers share

    # --- layer bookkeeping ---
    def _units(self) -> dict[int, list[tuple[str, str, LoraLayer]]]:
        """Transformer layer index -> its LoRA modules as (path, name within the layer, layer)."""
        units: dict[int, list[tuple[str, str, LoraLayer]]] = {}
        for path, layer in self.layers():
            where = _layer_of(path, self.config.layers_pattern)
            if where is not None and isinstance(layer, LoraLayer):
                units.setdefault(where[0], []).append((path, where[1], layer))
        return units

    def apply_selection(self, kept_layers: Iterable[int]) -> None:
        """Keep each of `kept_layers` its own LoRA; tie the LoRA of every other layer to one shared LoRA per module
        name and shape (the first dropped layer's current tensors become the shared ones)."""
        if self.kept_layers is not None:
            raise PeftkitError(f"LoRA-drop layers were already selected (kept {self.kept_layers}); attach a new "
                               "adapter to select again.")
        units = self._units()
        kept = sorted(set(kept_layers))
        unknown = [i for i in kept if i not in units]
        if unknown:
            raise ConfigError(f"LoRA-drop cannot keep layer(s) {unknown}: the adapter has LoRA in layers "
                              f"{sorted(units)} only.")
        dropped = [i for i in sorted(units) if i not in kept]
        shared: dict[tuple[Any, ...], LoraLayer] = {}
        name = self.adapter_name
        for index in dropped:
            for _, suffix, layer in units[index]:
                key = (suffix, type(layer), tuple(layer.lora_A[name].shape), tuple(layer.lora_B[name].shape))
                owner = shared.setdefault(key, layer)
                if owner is not layer:
                    layer.lora_A[name] = owner.lora_A[name]
                    layer.lora_B[name] = owner.lora_B[name]
        self.kept_layers, self.dropped_layers = kept, dropped
        self.shared_modules = sorted({key[0] for key in shared})

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Each shared tensor once (under the first dropped layer's key), so AdamW and clipping count it once."""
        seen: set[int] = set()
        out = []
        for key, p in super().trainable_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((key, p))
        return out

    # --- phase 1: selection ---
    @torch.no_grad()
    def layer_importance(self, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str | None = None,
                         forward: Callable[[nn.Module, dict[str, torch.Tensor]], Any] | None = None
                         ) -> dict[int, float]:
        """g_i = mean over real tokens x of sum over layer i's LoRA modules of ||s B A x||² (LoRA-drop Sec. 3).

        `forward(model, batch)` runs the model on a batch (the run's objective loss, which knows padding-free
        batches); by default a plain forward of a padded batch.
        """
        units = self._units()
        sums: dict[int, torch.Tensor | float] = {index: 0.0 for index in units}  # on the device: no sync per module
        state: dict[str, torch.Tensor | None] = {"mask": None}

        def hook(index: int, layer: LoraLayer) -> Any:
            def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _output: Any) -> None:
                x = args[0] if args else kwargs["x"]
                out_sq = _lora_output(layer, self.adapter_name, x).pow(2).sum(-1)
                mask = state["mask"]
                if mask is not None and mask.shape == out_sq.shape:
                    out_sq = out_sq[mask]
                sums[index] = sums[index] + out_sq.sum(dtype=torch.float64)
            return record

        def plain(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
            return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)

        handles = [layer.register_forward_hook(hook(index, layer), with_kwargs=True)
                   for index, mods in units.items() for _, _, layer in mods]
        model = self.model
        was_training = model.training
        model.eval()
        tokens = 0
        try:
            for batch in batches:
                if device is not None:
                    batch = {k: v.to(device) for k, v in batch.items()}
                state["mask"] = _token_mask(batch)
                tokens += int(state["mask"].sum())
                (forward or plain)(model, batch)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return {index: float(total) / max(tokens, 1) for index, total in sums.items()}

    def _sample(self, context: TrainingContext) -> list[int]:
        """The indices of D_s: a seeded uniform share of the training examples, at least one batch."""
        if not context.train_size:
            raise ConfigError("LoRA-drop needs training data to select layers; the training set is empty.")
        wanted = math.ceil(self.config.lora_drop_sample_ratio * context.train_size)
        n = min(context.train_size, max(wanted, context.batch_size))
        order = torch.randperm(context.train_size, generator=torch.Generator().manual_seed(context.seed)).tolist()
        return order[:n]

    def _train_on_sample(self, context: TrainingContext, sample: list[int]) -> int:
        """A short LoRA training on the sample with an optimizer of its own, through the run's own step."""
        from tqdm.auto import tqdm

        bs, ga = context.batch_size, context.accumulation
        batches_per_pass = math.ceil(len(sample) / bs)
        steps = self.config.lora_drop_steps or math.ceil(batches_per_pass / ga)
        optimizer = context.make_optimizer([p for _, p in self.trainable_parameters()])
        g = torch.Generator().manual_seed(context.seed + 1)

        def micro_batches() -> Iterator[dict[str, torch.Tensor]]:
            while True:
                order = torch.randperm(len(sample), generator=g).tolist()
                yield from context.batches([sample[j] for j in order])

        stream = micro_batches()
        was_training = self.model.training
        self.model.train()
        try:
            for _ in tqdm(range(steps), desc="lora-drop selection", unit="step", dynamic_ncols=True, leave=False):
                context.step(optimizer, [next(stream) for _ in range(ga)])
        finally:
            self.model.train(was_training)
        return steps

    def prepare(self, context: TrainingContext) -> None:
        """Phase 1: train on a sample, rank layers by LoRA output, tie the dropped ones; reset the LoRA for phase 2."""
        if self.kept_layers is not None:
            print(f"LoRA-drop: layers already selected (kept {self.kept_layers}); training them as they are.")
            return
        record_path = Path(context.output_dir) / RECORD_NAME
        if context.resuming and record_path.is_file():
            record = json.loads(record_path.read_text())
            if sorted(int(i) for i in record["importance"]) == sorted(self._units()):
                self.importance = {int(i): float(v) for i, v in record["importance"].items()}
                self.apply_selection(record["kept_layers"])
                print(f"LoRA-drop: resuming with the layers selected before ({RECORD_NAME}): " + self._summary())
                return

        initial = {key: t.detach().clone() for key, t in self.state_dict().items()}
        sample = self._sample(context)
        steps = self._train_on_sample(context, sample)
        self.importance = self.layer_importance(context.batches(sample), forward=context.loss)
        with torch.no_grad():  # fresh LoRA for phase 2 (and biases / saved modules back to their start)
            for key, t in self.state_dict().items():
                t.copy_(initial[key])
        self.apply_selection(select_layers(self.importance, self.config.lora_drop_threshold))
        self._write_record(record_path, len(sample), steps)
        print(self._summary())
        print(f"After LoRA-drop: {trainable_report(self.model)}")

    def _write_record(self, path: Path, sample_size: int, steps: int) -> None:
        total = sum(self.importance.values()) or 1.0
        record = {
            "kept_layers": self.kept_layers,
            "dropped_layers": self.dropped_layers,
            "shared_modules": self.shared_modules,
            "importance": {str(i): v for i, v in sorted(self.importance.items())},
            "importance_share": {str(i): v / total for i, v in sorted(self.importance.items())},
            "threshold": self.config.lora_drop_threshold,
            "sample_size": sample_size,
            "selection_steps": steps,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))

    # --- reporting ---
    def _summary(self) -> str:
        line = f"LoRA-drop: kept layers {self.kept_layers} with their own LoRA"
        total = sum(self.importance.values())
        if total > 0:
            share = sum(self.importance.get(i, 0.0) for i in self.kept_layers or []) / total
            line += f" ({share:.1%} of the LoRA output importance, threshold {self.config.lora_drop_threshold:.0%})"
        if self.dropped_layers:
            line += (f"; layers {self.dropped_layers} share one LoRA per module "
                     f"({', '.join(self.shared_modules)})")
        return line + "."

    def notes(self) -> list[str]:
        if self.kept_layers is None:
            line = "LoRA-drop: layers are selected when training starts; until then every layer has its own LoRA."
        else:
            line = self._summary()
        return [*super().notes(), line]
