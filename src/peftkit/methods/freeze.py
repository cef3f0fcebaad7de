"""Freeze (partial) fine-tuning, LLaMA-Factory's `finetuning_type: freeze`: the last (or first) N decoder layers train,
optionally only some modules inside them, plus chosen modules outside the layer stack (embed_tokens, norm, lm_head).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import ConfigError
from ..models import layer_stack
from ..settings import Setting
from .base import Method, MethodConfig, cast_floats, register, reject_adapter_keys

HALF = (torch.float16, torch.bfloat16)


def _names(value: list[str] | str | None) -> list[str]:
    """`"mlp,self_attn"` or `["mlp", "self_attn"]` -> `["mlp", "self_attn"]`."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]


@dataclasses.dataclass
class FreezeConfig(MethodConfig):
    freeze_trainable_layers: int = 2  # N > 0: the last N decoder layers train; N < 0: the first |N|
    freeze_trainable_modules: list[str] | str = "all"  # module names inside those layers, or "all"
    freeze_extra_modules: list[str] | str | None = None  # modules outside the layers that also train

    method = "freeze"
    yaml_keys = (
        Setting("freeze_trainable_layers", int, 2, "Train the last N decoder layers (a negative N: the first |N|)."),
        Setting("freeze_trainable_modules", str | list[str], "all",
                "Module names inside those layers that train (e.g. mlp,self_attn), or all."),
        Setting("freeze_extra_modules", str | list[str] | None, None,
                "Modules outside the decoder layers that also train, e.g. embed_tokens."),
    )

    def __post_init__(self) -> None:
        reject_adapter_keys(self, "choose what trains with freeze_trainable_layers, freeze_trainable_modules and "
                                  "freeze_extra_modules.")
        n = self.freeze_trainable_layers
        if not isinstance(n, int) or isinstance(n, bool) or n == 0:
            raise ConfigError(f"freeze_trainable_layers must be a non-zero integer, got {n!r}: N > 0 trains the last N "
                              "decoder layers, -N the first N.")
        modules = _names(self.freeze_trainable_modules)
        if not modules:
            raise ConfigError("freeze_trainable_modules is empty; set it to 'all' or to module names inside the "
                              "decoder layers, e.g. mlp,self_attn.")
        if "all" in modules and len(modules) > 1:
            raise ConfigError(f"freeze_trainable_modules {modules} mixes 'all' with module names; give either 'all' or "
                              "the names.")
        self.freeze_trainable_modules = modules
        self.freeze_extra_modules = _names(self.freeze_extra_modules) or None


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith(f".{name}")


@register
class Freeze(Method):
    """Trains a chosen part of the base model's own weights in place and saves only those tensors."""

    name = "freeze"
    config_class = FreezeConfig
    config: FreezeConfig
    in_place = True

    def attach(self) -> None:
        cfg = self.config
        found = layer_stack(self.model)
        if found is None:
            raise ConfigError(f"Freeze tuning found no stack of decoder layers (an nn.ModuleList of blocks) in "
                              f"{type(self.model).__name__}; use finetuning_type: full or lora for this model.")
        stack_path, stack = found
        n, total = cfg.freeze_trainable_layers, len(stack)
        if abs(n) > total:
            raise ConfigError(f"freeze_trainable_layers is {n}, but the model has {total} decoder layers "
                              f"({stack_path}); use 1..{total} (the last N) or -1..-{total} (the first N).")
        self.layer_ids = list(range(total - n, total)) if n > 0 else list(range(-n))
        self.stack_path, self.total_layers = stack_path, total
        chosen: list[nn.Module] = []
        for i in self.layer_ids:
            chosen += self._in_layer(stack[i])
        chosen += self._extra(stack_path)
        wanted = {id(p) for m in chosen for p in m.parameters()}
        self._names = [name for name, p in self.model.named_parameters() if id(p) in wanted]
        self._upcast_from = self._keep_fp32(wanted)
        for name in self._names:
            self.model.get_parameter(name).requires_grad_(True)

    def _in_layer(self, block: nn.Module) -> list[nn.Module]:
        modules = self.config.freeze_trainable_modules
        if modules == ["all"]:
            return [block]
        found = []
        named = [(path, m) for path, m in block.named_modules() if path]
        for name in modules:
            hits = [m for path, m in named if _matches(path, name)]
            if not hits:
                children = sorted(path for path, _ in named if "." not in path)
                inner = sorted({path.rsplit(".", 1)[-1] for path, _ in named if "." in path})
                raise ConfigError(f"freeze_trainable_modules '{name}' is not a module of the decoder layers. Choose "
                                  f"from: {', '.join(children)}; or modules inside them: {', '.join(inner)}; or all.")
            found += hits
        return found

    def _extra(self, stack_path: str) -> list[nn.Module]:
        """Modules outside the layer stack: neither inside it nor containing it (that would be the whole model)."""
        outside = [(path, m) for path, m in self.model.named_modules()
                   if path and not path.startswith(f"{stack_path}.") and not f"{stack_path}.".startswith(f"{path}.")]
        found = []
        for name in self.config.freeze_extra_modules or []:
            hits = [m for path, m in outside if _matches(path, name)]
            if not hits:
                valid = sorted({path.rsplit(".", 1)[-1] for path, m in outside
                                if next(m.parameters(recurse=False), None) is not None})
                raise ConfigError(f"freeze_extra_modules '{name}' is not a module outside the decoder layers. Choose "
                                  f"from: {', '.join(valid)}.")
            found += hits
        return found

    def _keep_fp32(self, wanted: set[int]) -> torch.dtype | None:
        """Trained tensors of a half-precision model go to float32 (AdamW updates below bf16's resolution would be
        lost); hooks cast each owning module's inputs up and its outputs back, so the frozen parts run unchanged."""
        owners: list[tuple[nn.Module, torch.dtype]] = []
        for module in self.model.modules():
            half = [p for p in module.parameters(recurse=False) if id(p) in wanted and p.dtype in HALF]
            if half:
                owners.append((module, half[0].dtype))
        for module, _ in owners:
            for p in module.parameters(recurse=False):
                if id(p) in wanted and p.dtype in HALF:
                    p.data = p.data.float()
        for module, dtype in owners:
            module.register_forward_pre_hook(lambda _m, args, kwargs: (cast_floats(args, torch.float32),
                                                                       cast_floats(kwargs, torch.float32)),
                                             with_kwargs=True)
            module.register_forward_hook(lambda _m, _args, out, dtype=dtype: cast_floats(out, dtype))
        return owners[0][1] if owners else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained parameters under their own names (a tied lm_head appears once, as embed_tokens)."""
        return {name: self.model.get_parameter(name) for name in self._names}

    def notes(self) -> list[str]:
        cfg = self.config
        ids = self.layer_ids
        span = f"{ids[0]}..{ids[-1]}" if len(ids) > 1 else str(ids[0])
        line = (f"Freeze: training {len(ids)} of {self.total_layers} decoder layers ({self.stack_path}.{span}; "
                f"modules: {', '.join(cfg.freeze_trainable_modules)})")
        if cfg.freeze_extra_modules:
            line += f" and {', '.join(cfg.freeze_extra_modules)}"
        grad = sum(p.numel() * p.element_size() for p in self.state_dict().values())
        lines = [line, f"Gradients: {grad / 2**20:,.1f} MiB (one per trainable parameter)"]
        if self._upcast_from is not None:
            lines.append(f"The trained tensors are kept in float32 (the rest of the model stays {self._upcast_from}).")
        return lines
