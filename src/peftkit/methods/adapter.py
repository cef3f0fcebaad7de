"""Bottleneck adapters: Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP") and Pfeiffer et al.
2020 ("AdapterFusion").

An adapter maps a block's output h to h + W_up f(W_down h + b_down) + b_up (Houlsby et al. 2019, Fig. 2), with
W_down [m, d], W_up [d, m], m << d the bottleneck size and f a non-linearity. Houlsby places one after the attention
block and one after the feed-forward block of every layer, both before the residual add; Pfeiffer only the one after
the feed-forward block. W_up and b_up start at zero, so the adapted model starts exactly as the base model.
The non-linearity makes the adapter impossible to fold into any weight, so it is not mergeable.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, PeftkitError
from ..settings import Setting
from .base import (
    ALL_LINEAR,
    LINEAR_TYPES,
    AdapterLayer,
    Method,
    MethodConfig,
    find_targets,
    linear_features,
    register,
    top_level_modules,
)

ADAPTER_TYPES = ("houlsby", "pfeiffer")
NON_LINEARITIES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
# Names of a decoder block's attention and feed-forward modules: Llama / Qwen2 / Mistral / Gemma / Phi-3 (self_attn,
# mlp), GPT-2 (attn, mlp), Falcon (self_attention), Mixtral (block_sparse_moe). Each returns its output before the
# block's residual add, which is where the adapters go.
ATTENTION_NAMES = ("self_attn", "attn", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")


def _choice_error(key: str, value: Any, options: tuple[str, ...] | list[str]) -> ConfigError:
    close = difflib.get_close_matches(str(value), list(options), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{key} must be one of: {', '.join(options)}; got {value!r}.{hint}")


@dataclasses.dataclass
class AdapterConfig(MethodConfig):
    """`target_modules` (optional) names the modules whose output gets an adapter, overriding `adapter_type`'s
    placement; by default the attention and MLP blocks of every decoder layer are found by name."""

    adapter_type: str = "houlsby"
    adapter_size: int | None = None  # None: round(output size / reduction_factor), at least 1
    reduction_factor: float = 16
    non_linearity: str = "relu"

    method = "adapter"
    yaml_keys = (
        Setting("adapter_type", str, "houlsby", "Houlsby: adapters after attention and MLP; Pfeiffer: after the MLP.",
                choices=ADAPTER_TYPES),
        Setting("adapter_size", int | None, None, "Bottleneck width. Empty: hidden size / reduction_factor."),
        Setting("reduction_factor", float, 16, "Bottleneck width as a fraction of the hidden size (1 / this)."),
        Setting("adapter_non_linearity", str, "relu", "The bottleneck's activation.", choices=tuple(NON_LINEARITIES),
                field="non_linearity"),
    )

    def __post_init__(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise _choice_error("adapter_type", self.adapter_type, ADAPTER_TYPES)
        if self.non_linearity not in NON_LINEARITIES:
            raise _choice_error("adapter_non_linearity", self.non_linearity, list(NON_LINEARITIES))
        size = self.adapter_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"adapter_size must be an integer >= 1 (or unset, for hidden_size / reduction_factor), "
                              f"got {size!r}.")
        factor = self.reduction_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ConfigError(f"reduction_factor must be a number greater than 0 (16 is usual), got {factor!r}.")
        if self.target_modules == ALL_LINEAR or self.target_modules == [ALL_LINEAR]:
            raise ConfigError("target_modules 'all-linear' does not apply to bottleneck adapters, which go after whole "
                              "blocks: leave it unset, or name blocks such as self_attn, mlp.")

    def size_for(self, dim: int) -> int:
        """The bottleneck width for a module with `dim` output features."""
        return self.adapter_size if self.adapter_size is not None else max(1, round(dim / self.reduction_factor))


class BottleneckLayer(AdapterLayer):
    """Wraps an attention or MLP block and adds the active adapter to its output (element 0 of a tuple output)."""

    def __init__(self, base_layer: nn.Module, dim: int) -> None:
        super().__init__(base_layer)
        self.dim = dim
        self.adapter_down = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()

    def __getattr__(self, name: str) -> Any:
        """Reach the wrapped block's attributes (e.g. `layer_idx`, `config`), which model code may read."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def add(self, name: str, cfg: AdapterConfig) -> None:
        param = next(self.base_layer.parameters(), None)
        device = param.device if param is not None else None
        size = cfg.size_for(self.dim)
        down = nn.Linear(self.dim, size, device=device)  # nn.Linear's default init, as LoRA's A
        up = nn.Linear(size, self.dim, device=device)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_down[name] = down
        self.adapter_act[name] = NON_LINEARITIES[cfg.non_linearity]()
        self.adapter_up[name] = up

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down.keys())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def delete_adapter(self, name: str) -> None:
        for holder in (self.adapter_down, self.adapter_act, self.adapter_up):
            if name in holder:
                del holder[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        """h + up(f(down(h))), computed in the adapter's dtype and added back in h's."""
        name = self.active_adapter
        down, act, up = self.adapter_down[name], self.adapter_act[name], self.adapter_up[name]
        return h + up(act(down(h.to(down.weight.dtype)))).to(h.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if not self.use_adapter:
            return out
        if isinstance(out, torch.Tensor):
            return self.adapt(out)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (self.adapt(out[0]), *out[1:])
        raise PeftkitError(f"{type(self.base_layer).__name__} returns {type(out).__name__}, not a tensor or a tuple "
                           "starting with one: a bottleneck adapter cannot follow it. Choose other target_modules.")


def _output_dim(module: nn.Module, hidden_size: int | None) -> int:
    """Output features of a linear or embedding module, else the model's hidden size (a block's output)."""
    if isinstance(module, LINEAR_TYPES):
        return linear_features(module)[1]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if hidden_size is None:
        raise ConfigError(f"Cannot tell the output size of {type(module).__name__}: the model config has no "
                          "hidden_size. Target linear layers instead, or set adapter_size and hidden_size.")
    return hidden_size


@register
class BottleneckAdapter(Method):
    """Houlsby / Pfeiffer bottleneck adapters after the attention and MLP blocks."""

    name = "adapter"
    config_class = AdapterConfig
    config: AdapterConfig
    mergeable = False

    def _block_paths(self) -> list[str]:
        """The attention / MLP blocks of every decoder layer (honouring layers_to_transform and layers_pattern)."""
        cfg = self.config
        kinds = (ATTENTION_NAMES, MLP_NAMES) if cfg.adapter_type == "houlsby" else (MLP_NAMES,)
        patterns = [cfg.layers_pattern] if isinstance(cfg.layers_pattern, str) else cfg.layers_pattern
        wanted = [cfg.layers_to_transform] if isinstance(cfg.layers_to_transform, int) else cfg.layers_to_transform
        paths = []
        for stack_path, stack in self.model.named_modules():
            if not isinstance(stack, nn.ModuleList) or (patterns and stack_path.rsplit(".", 1)[-1] not in patterns):
                continue
            for index, block in enumerate(stack):
                children = dict(block.named_children())
                found = [next((n for n in names if n in children), None) for names in (ATTENTION_NAMES, MLP_NAMES)]
                if None in found or (wanted is not None and index not in wanted):
                    continue  # not a decoder block (it needs both an attention and an MLP), or not a chosen layer
                for names in kinds:
                    child = next(n for n in names if n in children)
                    paths.append(f"{stack_path}.{index}.{child}" if stack_path else f"{index}.{child}")
        return paths

    def _targets(self) -> list[str]:
        cfg = self.config
        if cfg.target_modules is not None:
            return find_targets(self.model, cfg.target_modules, layers_to_transform=cfg.layers_to_transform,
                                layers_pattern=cfg.layers_pattern, types=(nn.Module,), exclude=cfg.modules_to_save)
        paths = self._block_paths()
        if not paths:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            where = f" in layers {cfg.layers_to_transform}" if cfg.layers_to_transform is not None else ""
            raise ConfigError(
                f"Found no decoder blocks{where} for bottleneck adapters in model type '{model_type}': looked for "
                f"layers holding an attention module named {' / '.join(ATTENTION_NAMES)} and an MLP named "
                f"{' / '.join(MLP_NAMES)}. Set target_modules to the names of the modules whose outputs should get "
                f"adapters; this model's modules include: {', '.join(top_level_modules(self.model))}."
            )
        return paths

    def attach(self) -> None:
        hidden_size = getattr(getattr(self.model, "config", None), "hidden_size", None)
        for path in self._targets():
            module = self.wrap(path, BottleneckLayer, lambda m: BottleneckLayer(m, _output_dim(m, hidden_size)),
                               hint=" Target its enclosing block instead.")
            module.add(self.adapter_name, self.config)
        self.attach_modules_to_save()

    def notes(self) -> list[str]:
        layers = [(path, layer) for path, layer in self.layers() if isinstance(layer, BottleneckLayer)]
        if not layers:
            return []
        sizes = sorted({layer.adapter_down[self.adapter_name].out_features for _, layer in layers})
        blocks = sorted({path.rsplit(".", 1)[-1] for path, _ in layers})
        return [f"{self.config.adapter_type} bottleneck adapters: {len(layers)} of size "
                f"{', '.join(map(str, sizes))} ({self.config.non_linearity}) after {', '.join(blocks)}; not mergeable"]
