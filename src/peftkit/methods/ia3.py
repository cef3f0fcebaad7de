"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

A target layer y = W x + b gets a learned vector l, initialised to ones (Sec. 3.3): attention-like targets scale the
layer's output, y = l ⊙ (W x + b); feed-forward targets scale its input, y = W (l ⊙ x) + b. Both fold into the weight
(W' = diag(l) W, b' = l ⊙ b, resp. W' = W diag(l)), so merging is exact and inference costs nothing extra.

The vectors keep PEFT's shapes, [out, 1] for output scaling and [1, in] for input scaling, so PEFT files load as
they are.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from ..errors import AdapterLoadError, ConfigError
from ..settings import Setting
from .base import ALL_LINEAR, LINEAR_TYPES, LinearAdapterLayer, Method, MethodConfig, find_targets, register

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING for the decoder models we
# load, so an adapter trained with defaults here is the one PEFT users get with defaults there.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "bert": ["key", "value", "output.dense"],
}
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "phi": ["fc2"],
    "gpt2": ["mlp.c_proj"],
    "gpt_neox": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "bert": ["output.dense"],
}
_REGEX_CHARS = "*+?[]()|\\^$"
# PEFT 0.21's IA3Config fields besides the file's own (peft_type, base_model_name_or_path, ...): all of them ours too
_PEFT_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save",
                "init_ia3_weights", "task_type")


def _name_list(value: list[str] | str | None) -> list[str] | str | None:
    """A comma-separated string of plain names (YAML's `a,b`) -> a list; a regex stays a string, as in PEFT."""
    if isinstance(value, str) and value != ALL_LINEAR and not any(ch in value for ch in _REGEX_CHARS):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


@dataclasses.dataclass
class Ia3Config(MethodConfig):
    feedforward_modules: list[str] | str | None = None  # None: the architecture's default (PEFT's mapping)
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False  # set on attach when the targets are GPT-2 Conv1D layers
    init_ia3_weights: bool = True  # False: random vectors (PEFT's option, for tests)

    method = "ia3"
    yaml_keys = (Setting("feedforward_modules", str | list[str] | None, None,
                         "IA3: targets whose input (not output) is scaled. Empty: the architecture's MLP layers."),)

    def __post_init__(self) -> None:
        self.target_modules = _name_list(self.target_modules)
        self.feedforward_modules = _name_list(self.feedforward_modules)
        if self.layers_to_transform is not None or self.layers_pattern is not None:
            raise ConfigError("IA3 has no layers_to_transform / layers_pattern (PEFT's IA3 config lacks them, so the "
                              r"adapter could not be loaded there); use a regex target_modules such as "
                              r"'.*\.(0|1)\..*(k_proj|v_proj|down_proj)' instead.")
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be true or false, got {self.init_ia3_weights!r}.")
        self.check_subset()

    def check_subset(self) -> None:
        """PEFT refuses a config whose feedforward_modules are not among its target_modules, so we do too."""
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ConfigError(
                    f"feedforward_modules must be a subset of target_modules {self.target_modules}, but "
                    f"{', '.join(extra)} is not a target: add it to target_modules or remove it from "
                    "feedforward_modules."
                )

    # --- PEFT's IA3 format ---
    peft_type = "IA3"
    peft_tensor_names = ((".ia3_scale", ".ia3_l"),)

    def to_peft(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _PEFT_FIELDS}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> Ia3Config:
        """A field of a later PEFT release that is set (not null/false/empty) may change the maths, so it is refused
        rather than ignored."""
        for key, value in raw.items():
            if key not in _PEFT_FIELDS and value not in (None, False, {}, []):
                raise AdapterLoadError(f"{where} uses PEFT's IA3 setting '{key}' ({value!r}), which peftkit does not "
                                       "support.")
        values = {k: raw[k] for k in _PEFT_FIELDS if raw.get(k) is not None}
        for key in ("target_modules", "feedforward_modules", "exclude_modules"):
            if isinstance(values.get(key), list):
                values[key] = sorted(values[key])
            elif isinstance(values.get(key), str) and values[key] != ALL_LINEAR:
                # a regex to PEFT even without regex characters, which Ia3Config would split
                values[key] = f"(?:{values[key]})"
        values["init_ia3_weights"] = True  # only affects initialisation, which loading overwrites
        return Ia3Config(**values)


def _matches_feedforward(path: str, feedforward: list[str] | str) -> bool:
    """PEFT's rule, kept exactly so a PEFT file means the same here: a regex must match the whole path, a name must
    end it (plain `endswith`, no dot required)."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(name) for name in feedforward)


def _excluded(path: str, exclude: list[str] | str | None) -> bool:
    """PEFT's `exclude_modules`: a regex matches the whole path; a name equals it or ends it after a dot."""
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, path) is not None
    return path in exclude or any(path.endswith(f".{name}") for name in exclude)


class Ia3Layer(LinearAdapterLayer):
    """(IA)³ vectors on nn.Linear or GPT-2's Conv1D (weight stored [in, out])."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_scale = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self._saved_bias: torch.Tensor | None = None  # the bias before merging, to unmerge it exactly
        self._saved_weight: torch.Tensor | None = None  # only when a zero in l makes dividing back impossible

    def add(self, name: str, feedforward: bool, init_ones: bool) -> None:
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        device = self.base_layer.weight.device
        vector = torch.ones(shape, device=device) if init_ones else torch.randn(shape, device=device)
        self.ia3_scale[name] = nn.Parameter(vector)
        self.feedforward[name] = feedforward

    def adapter_names(self) -> list[str]:
        return list(self.ia3_scale.keys())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_scale": self.ia3_scale[name]}

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.ia3_scale[name]
        self.feedforward.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def _weight_factor(self, name: str) -> torch.Tensor:
        """l shaped to broadcast over the stored weight: [out, 1] / [1, in] for Linear, transposed for Conv1D."""
        vector = self.ia3_scale[name].detach().float()
        return vector.T if self.fan_in_fan_out else vector

    def merge(self, name: str) -> None:
        if self.merged_adapters:
            self.unmerge()
        base = self.base_layer
        factor = self._weight_factor(name)
        with torch.no_grad():
            if (factor == 0).any():
                self._saved_weight = base.weight.detach().clone()
            base.weight.copy_((base.weight.float() * factor).to(base.weight.dtype))
            if not self.feedforward[name] and base.bias is not None:  # the output scale multiplies the bias too
                self._saved_bias = base.bias.detach().clone()
                base.bias.copy_((base.bias.float() * factor.flatten()).to(base.bias.dtype))
        self.merged_adapters = [name]

    def unmerge(self) -> None:
        base = self.base_layer
        for name in self.merged_adapters:
            with torch.no_grad():
                if self._saved_weight is not None:
                    base.weight.copy_(self._saved_weight)
                else:
                    base.weight.copy_((base.weight.float() / self._weight_factor(name)).to(base.weight.dtype))
                if self._saved_bias is not None:
                    base.bias.copy_(self._saved_bias)
        self._saved_weight = self._saved_bias = None
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.use_adapter:
            return self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        scale = self.ia3_scale[name].flatten()
        if self.feedforward[name]:  # dtype handling as PEFT's, so half-precision outputs agree too
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)


@register
class Ia3(Method):
    """Learned scaling vectors on the keys, values and feed-forward inputs."""

    name = "ia3"
    config_class = Ia3Config
    config: Ia3Config

    def attach(self) -> None:
        cfg = self.config
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if cfg.target_modules is None:
            if model_type not in DEFAULT_TARGETS:
                raise ConfigError(f"No default IA3 targets for model type '{model_type}'; set target_modules and "
                                  "feedforward_modules (the targets whose input, not output, is scaled).")
            cfg.target_modules = list(DEFAULT_TARGETS[model_type])  # recorded, as PEFT does
        paths = find_targets(self.model, cfg.target_modules, types=LINEAR_TYPES, exclude=cfg.modules_to_save)
        paths = [p for p in paths if not _excluded(p, cfg.exclude_modules)]
        if not paths:
            raise ConfigError(f"exclude_modules {cfg.exclude_modules!r} removed every IA3 target; narrow it.")
        if cfg.feedforward_modules is None:
            if model_type not in DEFAULT_FEEDFORWARD:
                raise ConfigError(f"No default IA3 feedforward_modules for model type '{model_type}'; set them (the "
                                  "targets whose input is scaled, usually the MLP's down projection), or [] for none.")
            # the default names that concern a chosen target (PEFT keeps them all, then refuses its own file on load)
            cfg.feedforward_modules = [f for f in DEFAULT_FEEDFORWARD[model_type]
                                       if any(_matches_feedforward(p, [f]) for p in paths)]
        cfg.check_subset()
        for path in paths:
            module = self.wrap(path, Ia3Layer)
            if module.fan_in_fan_out:
                cfg.fan_in_fan_out = True
            module.add(self.adapter_name, _matches_feedforward(path, cfg.feedforward_modules), cfg.init_ia3_weights)
        self.attach_modules_to_save()

    def notes(self) -> list[str]:
        layers = [layer for _, layer in self.layers() if isinstance(layer, Ia3Layer)]
        inputs = sum(layer.feedforward[self.adapter_name] for layer in layers)
        return [f"IA3: {len(layers) - inputs} layers scale their output, {inputs} (feed-forward) their input."]
