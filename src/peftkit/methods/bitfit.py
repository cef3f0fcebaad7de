"""BitFit (Zaken et al. 2021, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models"): only the bias terms train.

Each target layer y = f(x) + b gets a trainable per-adapter delta: y = f(x) + b + delta, delta starting at zero. Layers
with no bias (every linear of Llama, Qwen2's o_proj and MLP) get one this way. A delta rather than a trained copy of b,
because (1) one code path serves layers with and without a bias, (2) the base model stays untouched, so several
adapters, `disable_adapter` and unmerge work as for LoRA, and (3) AdamW's weight decay then pulls the bias towards
its pretrained value b, not towards 0, which would erase pretrained biases (the trained bias is b + delta either way).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from .base import ALL_LINEAR, LINEAR_TYPES, AdapterLayer, Method, MethodConfig, _layer_index, find_targets, register


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm and the models' own norms (LlamaRMSNorm, ...), recognised by class name; all normalise the last
    dimension, so a bias broadcasts over it (GroupNorm's per-channel bias would not)."""
    if isinstance(module, nn.GroupNorm):
        return False
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


@dataclasses.dataclass
class BitFitConfig(MethodConfig):
    method = "bitfit"


class BitFitLayer(AdapterLayer):
    """A linear (nn.Linear, GPT-2's Conv1D) or norm layer plus one bias delta per adapter."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.had_bias = _has_bias(base_layer)
        self._saved_bias: torch.Tensor | None = None  # the base bias before merging, to unmerge exactly
        # (model config, its flag, the flag's value before any merge) that makes transformers build this layer with a
        # bias (Llama's attention_bias): true while a new bias is merged in, so a merged save reloads with it.
        self.bias_flag: tuple[Any, str, bool] | None = None
        if isinstance(base_layer, Conv1D):
            self.shape: tuple[int, ...] = (base_layer.nf,)
        elif isinstance(base_layer, nn.Linear):
            self.shape = (base_layer.out_features,)
        else:
            self.shape = tuple(base_layer.bias.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that inspects `layer.weight` (transformers, generation utils) still works."""
        return self.base_layer.weight

    def add(self, name: str) -> None:
        self.bitfit_bias[name] = nn.Parameter(torch.zeros(self.shape, device=self.base_layer.weight.device))

    def adapter_names(self) -> list[str]:
        return list(self.bitfit_bias.keys())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"bitfit_bias": self.bitfit_bias[name]}

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapters == [name]:
            self.unmerge()
        del self.bitfit_bias[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def probe_input(self) -> torch.Tensor:
        w = self.base_layer.weight
        if isinstance(self.base_layer, Conv1D):
            features: tuple[int, ...] = (w.shape[0],)
        elif isinstance(self.base_layer, nn.Linear):
            features = (self.base_layer.in_features,)
        else:
            features = self.shape
        return torch.randn(2, 4, *features, device=w.device).to(w.dtype)

    def merge(self, name: str) -> None:
        """Add the delta into the base bias, creating the base layer's bias tensor where it had none."""
        if self.merged_adapters:
            self.unmerge()
        base, delta = self.base_layer, self.bitfit_bias[name].detach()
        w = base.weight
        with torch.no_grad():
            if self.had_bias:
                self._saved_bias = base.bias.detach().clone()
                base.bias.add_(delta.to(base.bias.dtype))
            else:
                base.bias = nn.Parameter(delta.to(device=w.device, dtype=w.dtype).clone(), requires_grad=False)
                if self.bias_flag is not None:
                    setattr(self.bias_flag[0], self.bias_flag[1], True)
        self.merged_adapters = [name]

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        if self.had_bias:
            with torch.no_grad():
                self.base_layer.bias.copy_(self._saved_bias)
            self._saved_bias = None
        else:
            self.base_layer.bias = None
            if self.bias_flag is not None:
                setattr(*self.bias_flag)
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.use_adapter:
            return result
        return result + self.bitfit_bias[self.active_adapter].to(result.dtype)


@register
class BitFit(Method):
    """Trains bias terms only: of every linear layer but the output head and of every norm that has one."""

    name = "bitfit"
    config_class = BitFitConfig
    config: BitFitConfig

    def _default_paths(self) -> list[str]:
        """All linear layers but the output head, plus the norms that have a bias (GPT-2's LayerNorms)."""
        cfg = self.config
        paths = find_targets(self.model, ALL_LINEAR, layers_to_transform=cfg.layers_to_transform,
                             layers_pattern=cfg.layers_pattern, types=LINEAR_TYPES, exclude=cfg.modules_to_save)
        wanted = cfg.layers_to_transform
        wanted = [wanted] if isinstance(wanted, int) else wanted
        excluded = cfg.modules_to_save or []
        for path, module in self.model.named_modules():
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            if not path or not _is_norm(base) or not _has_bias(base) or path in paths:
                continue
            if any(path == e or path.endswith(f".{e}") or f".{e}." in f".{path}." for e in excluded):
                continue
            if wanted is None or _layer_index(path, cfg.layers_pattern) in wanted:
                paths.append(path)
        return paths

    def attach(self) -> None:
        cfg = self.config
        if cfg.target_modules is None:
            paths = self._default_paths()
        else:
            norm_types = tuple({type(m) for m in self.model.modules() if _is_norm(m)})
            paths = find_targets(self.model, cfg.target_modules, layers_to_transform=cfg.layers_to_transform,
                                 layers_pattern=cfg.layers_pattern, types=(*LINEAR_TYPES, *norm_types),
                                 exclude=cfg.modules_to_save)
        for path in paths:
            module = self.model.get_submodule(path)
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            if not isinstance(base, LINEAR_TYPES) and not _has_bias(base):
                raise ConfigError(f"BitFit target '{path}' is a {type(base).__name__} without a bias; BitFit adds "
                                  "biases to linear layers only. Remove it from target_modules.")
            module = self.wrap(path, BitFitLayer, lambda m: self._new_layer(m, path))
            module.add(self.adapter_name)
        if cfg.target_modules is None:  # record what the default resolved to, as LoRA does
            cfg.target_modules = sorted({p.rsplit(".", 1)[-1] for p in paths})
        self.attach_modules_to_save()

    def _new_layer(self, module: nn.Module, path: str) -> BitFitLayer:
        layer = BitFitLayer(module)
        layer.bias_flag = _bias_flag(self.model, path) if not layer.had_bias else None
        return layer

    def notes(self) -> list[str]:
        layers = list(self.layers())
        new = [(p, layer) for p, layer in layers if not layer.had_bias]
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in new})
        lines = [f"BitFit: bias terms on {len(layers)} layers; {len(new)} of them had no bias and got a new one"
                 + (f" ({', '.join(names)})" if names else "")]
        lost = sorted({p.rsplit(".", 1)[-1] for p, layer in new if layer.bias_flag is None})
        if lost:
            lines.append(f"A merged save of this adapter loses the new biases of {', '.join(lost)} when transformers "
                         f"reloads it ({getattr(self.model.config, 'model_type', '?')} builds those layers without "
                         "one): serve it unmerged (peftkit chat --adapter).")
        return lines


def _bias_flag(model: nn.Module, path: str) -> tuple[Any, str, bool] | None:
    """The config flag that gives this layer a bias when transformers builds the model: Llama-style models have
    `attention_bias` (q/k/v/o_proj) and `mlp_bias` (gate/up/down_proj)."""
    config = getattr(model, "config", None)
    parts = path.split(".")[:-1]
    for flag, marker in (("attention_bias", "attn"), ("mlp_bias", "mlp")):
        if isinstance(getattr(config, flag, None), bool) and any(marker in part for part in parts):
            return config, flag, getattr(config, flag)
    return None
