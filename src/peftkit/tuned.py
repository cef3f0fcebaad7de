"""TunedModel: a transformers model plus named adapters that can be saved, loaded, switched, disabled and merged."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import AdapterLoadError, ConfigError, PeftkitError
from .io import peft_format
from .methods import available_methods, get_method
from .methods.base import (
    AdapterLayer,
    Method,
    MethodConfig,
    count_parameters,
    method_for_config,
    replace_module,
    trainable_report,
)
from .models import base_model_id, load_model_and_tokenizer, parse_dtype
from .precision import free_memory_bytes, inference_dtype
from .quantization import MERGE_REFUSAL, quantized_bits

DEFAULT_ADAPTER = "default"


class TunedModel(nn.Module):
    """A base model with adapters. Forward and `generate` behave as on the base model, plus the active adapter.

    The base model's own parameters are frozen; an adapter's parameters train while it is the active one.
    """

    def __init__(self, model: nn.Module, config: MethodConfig | None = None, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self.model = model
        self.adapters: dict[str, Method] = {}
        self.active_adapter: str | None = None
        for p in model.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        """Fall back to the base model, so `tuned.config`, `tuned.device` and friends work as users expect."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --- adapters ---
    def add_adapter(self, name: str, config: MethodConfig) -> Method:
        """Attach a new adapter; the first one becomes active (use `set_adapter` to switch)."""
        if name in self.adapters:
            raise ConfigError(f"An adapter named '{name}' already exists; pick another name or delete it first.")
        method_cls = method_for_config(config)
        in_place = ([m.name for m in self.adapters.values() if m.in_place]
                    + ([method_cls.name] if method_cls.in_place else []))
        if in_place and self.adapters:
            raise ConfigError(f"'{in_place[0]}' trains the base model's own weights, so it cannot share a model with "
                              "other adapters; load the base model again for another adapter.")
        method = method_cls(self.model, config, name)
        try:
            method.attach()
        except Exception:
            self._detach_partial(name)
            raise
        self.adapters[name] = method
        self.set_adapter(self.active_adapter or name)
        return method

    def _detach_partial(self, name: str) -> None:
        """Undo an attach that failed half-way: drop `name` from the layers it reached, unwrap layers left empty."""
        for layer in self._adapter_layers():
            if name in layer.adapter_names():
                layer.delete_adapter(name)
        empty = [(p, m) for p, m in self.model.named_modules() if isinstance(m, AdapterLayer) and not m.adapter_names()]
        for path, layer in reversed(empty):  # innermost first
            replace_module(self.model, path, layer.base_layer)

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter (its parameters train); the others stay in memory, frozen and unused."""
        if name not in self.adapters:
            raise ConfigError(f"No adapter named '{name}'. Loaded adapters: {', '.join(self.adapters) or 'none'}.")
        for layer in self._adapter_layers():
            layer.set_active(name)
        for other_name, method in self.adapters.items():
            for t in method.state_dict().values():
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(other_name == name)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ConfigError(f"No adapter named '{name}'.")
        for layer in self._adapter_layers():
            if name in layer.adapter_names():
                layer.delete_adapter(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None
            if self.adapters:
                self.set_adapter(next(iter(self.adapters)))

    @property
    def method(self) -> Method:
        """The active adapter's Method (what the trainer talks to)."""
        if self.active_adapter is None:
            raise PeftkitError("This model has no active adapter.")
        return self.adapters[self.active_adapter]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside this block: `with tuned.disable_adapter(): base_logits = tuned(x).logits`."""
        in_place = [m.name for m in self.adapters.values() if m.in_place]
        if in_place:
            raise PeftkitError(f"'{in_place[0]}' changed the base weights themselves; there is no base model left to "
                               "run without it. Load the base model separately to compare.")
        layers = list(self._adapter_layers())
        for layer in layers:
            if layer.merged_adapters:
                layer.unmerge()
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def _adapter_layers(self) -> Iterator[AdapterLayer]:
        return (m for m in self.model.modules() if isinstance(m, AdapterLayer))

    # --- forward ---
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    # --- parameters ---
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        return count_parameters(self.model)

    def trainable_report(self) -> str:
        """PEFT's trainable-parameter line, the optimizer state it costs, and the active method's notes."""
        trainable, _ = self.parameter_counts()
        lines = [trainable_report(self.model), f"AdamW state: {8 * trainable / 2**20:,.1f} MiB (two fp32 moments per "
                                               "trainable parameter)"]
        if self.active_adapter is not None:
            lines += self.method.notes()
        return "\n".join(lines)

    def print_trainable_parameters(self) -> None:
        print(self.trainable_report())

    # --- merge ---
    def merge_adapter(self, name: str | None = None, verify: bool = True, progress: bool = False) -> None:
        """Fold adapter `name` (default: the active one) into the base weights in place; `unmerge_adapter` undoes it.
        With `verify`, each layer's output on a random probe is compared before and after, so a wrong merge fails
        here rather than silently changing the model.
        """
        name = name or self.active_adapter
        method = self.adapters.get(name) if name else None
        if method is None:
            raise ConfigError(f"No adapter named '{name}' to merge.")
        if method.in_place:
            return  # its training already changed the base weights
        if not method.mergeable:
            raise PeftkitError(not_mergeable_message(method))
        bits = quantized_bits(self.model)
        if bits:
            raise PeftkitError(MERGE_REFUSAL.format(bits=bits))
        layers = [layer for layer in self._adapter_layers() if name in layer.adapter_names()]
        for layer in tqdm(layers, desc="merge", unit="layer", disable=not progress, dynamic_ncols=True):
            probe = layer.probe_input() if verify else None
            with torch.no_grad():
                before = layer(probe) if probe is not None else None
                layer.merge(name)
                if before is not None:
                    _check_merge(layer, before, layer(probe))

    def unmerge_adapter(self) -> None:
        for layer in self._adapter_layers():
            if layer.merged_adapters:
                layer.unmerge()

    def merge_and_unload(self, verify: bool = True, progress: bool = False) -> nn.Module:
        """Merge the active adapter and return the plain transformers model, ready for `save_pretrained`."""
        self.merge_adapter(verify=verify, progress=progress)
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every adapter layer (keeping whatever was merged) and return the plain base model."""
        for path, module in list(self.model.named_modules()):
            if isinstance(module, AdapterLayer):
                replace_module(self.model, path, module.base_layer)
        self.adapters.clear()
        self.active_adapter = None
        return self.model

    # --- save / load ---
    def save(self, directory: str | os.PathLike, adapter_names: list[str] | None = None) -> None:
        """Save adapters in PEFT's format: the default one at `directory`, any other at `directory/<name>`."""
        for name in adapter_names or list(self.adapters):
            target = Path(directory) if name == DEFAULT_ADAPTER or len(self.adapters) == 1 else Path(directory) / name
            peft_format.save_method(self.adapters[name], target, base_model_id(self.model))

    save_pretrained = save  # the name transformers and PEFT users type

    def load_adapter(self, directory: str | os.PathLike, name: str = DEFAULT_ADAPTER,
                     trainable: bool = False) -> Method:
        """Load an adapter saved by peftkit or PEFT; with `trainable=False` its parameters stay frozen."""
        config = peft_format.read_config(directory)
        try:
            method = self.add_adapter(name, config)
        except ConfigError as e:
            raise AdapterLoadError(f"The adapter in '{directory}' does not fit this base model: {e}") from e
        try:
            peft_format.load_weights(method, directory)
        except PeftkitError:
            self.delete_adapter(name)
            raise
        if not trainable:
            for t in method.state_dict().values():
                t.requires_grad_(False)
        return method

    @classmethod
    def load(
        cls, model: nn.Module, directory: str | os.PathLike, name: str = DEFAULT_ADAPTER, trainable: bool = False
    ) -> "TunedModel":
        """`TunedModel.load(base, "out/adapter")`: the base model with the saved adapter attached and active."""
        tuned = cls(model)
        tuned.load_adapter(directory, name, trainable=trainable)
        return tuned


def load_for_inference(name_or_path: str, adapter_dir: str | os.PathLike | None = None, *,
                       quantization: Any = None, trust_remote_code: bool = False,
                       dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for generation: the base model (quantized if asked), with the adapter in `adapter_dir`
    attached and active when given; in eval mode. `dtype` None or "auto" (LLaMA-Factory's `infer_dtype`): the
    checkpoint's own precision, or fp32 for a half-precision checkpoint on a CPU without fast bf16
    (`precision.inference_dtype`) when memory allows."""

    if adapter_dir:
        peft_format.read_config(adapter_dir)  # a wrong adapter path fails now, not after loading the model
    model, tokenizer = load_model_and_tokenizer(name_or_path, quantization=quantization, dtype=dtype,
                                                trust_remote_code=trust_remote_code)
    if quantization is None and parse_dtype(dtype) == "auto":
        model = _in_inference_dtype(model)
    if adapter_dir:
        model = TunedModel.load(model, adapter_dir)
    return model.eval(), tokenizer


def _in_inference_dtype(model: nn.Module) -> nn.Module:
    params = list(model.parameters())
    device = params[0].device.type if params else "cpu"
    want = inference_dtype(model.dtype, device)
    if want == model.dtype or any(p.device.type != device for p in params):
        return model
    size = sum(p.numel() for p in params) * torch.finfo(want).bits // 8
    if want == torch.float32 and size > 0.6 * free_memory_bytes():  # leave room for the decode kernel's bf16 copies
        return model
    return model.to(want)


def share_base(model: nn.Module) -> nn.Module:
    """A second module tree over the same tensors (no weight memory): adapters that cannot sit on one tree, such as
    two weight methods on the same modules, each get a tree of their own and still share the base weights."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def not_mergeable_message(method: Method | type[Method]) -> str:
    """Why `method` (an adapter, or its class) cannot be merged, and which methods can (for merge and export errors)."""

    can = [n for n in available_methods() if get_method(n).mergeable]
    return (f"finetuning_type '{method.name}' cannot be merged into the base weights: its layers add computation "
            f"(e.g. a non-linearity or new tokens) that no weight change reproduces. Use the adapter unmerged (peftkit "
            f"chat --adapter, or TunedModel.load), or train a mergeable finetuning_type: {', '.join(can)}.")


def _check_merge(layer: AdapterLayer, before: torch.Tensor, after: torch.Tensor) -> None:
    """Merged and unmerged outputs must agree to the precision of the base weights."""
    tol = 1e-4 if after.dtype == torch.float32 else 5e-2
    scale = before.abs().max().clamp_min(1.0)
    diff = (before.float() - after.float()).abs().max()
    if not torch.isfinite(after).all() or diff > tol * scale:
        layer.unmerge()
        raise PeftkitError(
            f"Merging {type(layer).__name__} changed its output by {diff.item():.3g} "
            f"(tolerance {tol * scale.item():.3g}): "
            "the adapter weights are probably not finite or too large for the base dtype. Merge in float32."
        )
