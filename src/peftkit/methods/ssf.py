"""SSF (Lian et al. 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning").

Every target operation's output y gets a learned per-feature scale and shift, y' = γ ⊙ y + β (Eq. 2), with γ = 1 and
β = 0 at the start so training begins from the base model. Targets are the linear layers and the norm layers, as in
the paper, which inserts SSF after every operation.

Merging (Eq. 4-5): a linear layer takes W' = diag(γ) W and b' = γ ⊙ b + β (a bias is created where it had none); an
affine norm takes w' = γ ⊙ w and b' = γ ⊙ b + β. A norm without a bias (Llama's RMSNorm) has nowhere to put a non-zero
β, so merging refuses there with a message rather than dropping β: a merged model that silently differs from the
trained one is worse than no merge, and keeping β as an extra layer would leave no plain transformers model to save.
A created linear bias survives save_pretrained / from_pretrained only where the architecture's config allows biases
(Llama: attention_bias, mlp_bias); `notes()` says so at the start of training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError, PeftkitError
from .base import LINEAR_TYPES, AdapterLayer, Method, MethodConfig, find_targets, linear_features, register

_NOT_FEATURE_NORMS = (nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)  # normalise over dim 1


def norm_dim(module: nn.Module) -> int | None:
    """The feature count of a norm layer acting on the last dimension (LayerNorm, any `*Norm` class), else None."""
    if isinstance(module, _NOT_FEATURE_NORMS):
        return None
    if not (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")):
        return None
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.numel()
    shape = getattr(module, "normalized_shape", None)
    return shape[-1] if isinstance(shape, tuple) and len(shape) == 1 else None


@dataclasses.dataclass
class SsfConfig(MethodConfig):
    """`target_modules` None: every linear layer but the output head, and every norm; `all-linear`: linears only."""

    method = "ssf"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("target_modules is empty: leave it unset for every linear and norm layer, or name some "
                              "(e.g. [q_proj, v_proj, input_layernorm]).")
        layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        if layers is not None and any(not isinstance(i, int) or i < 0 for i in layers):
            raise ConfigError(f"layers_to_transform must be layer indices >= 0, got {self.layers_to_transform!r}.")


class SsfLayer(AdapterLayer):
    """Scale and shift the output of a linear layer (nn.Linear, GPT-2's Conv1D) or of a norm layer."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.is_linear = isinstance(base_layer, LINEAR_TYPES)
        if self.is_linear:
            self.in_features, self.features = linear_features(base_layer)
        else:
            dim = norm_dim(base_layer)
            if dim is None:
                raise ConfigError(f"SSF can wrap linear and norm layers, not {type(base_layer).__name__}.")
            self.in_features = self.features = dim
        self.ssf_scale = nn.ParameterDict()
        self.ssf_shift = nn.ParameterDict()
        self._saved: dict[str, torch.Tensor | None] = {}  # base tensors before merging, to unmerge exactly

    def add(self, name: str) -> None:
        device = self._device()
        self.ssf_scale[name] = nn.Parameter(torch.ones(self.features, device=device))
        self.ssf_shift[name] = nn.Parameter(torch.zeros(self.features, device=device))

    def _device(self) -> torch.device:
        p = next(self.base_layer.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def adapter_names(self) -> list[str]:
        return list(self.ssf_scale.keys())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"ssf_scale": self.ssf_scale[name], "ssf_shift": self.ssf_shift[name]}

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.ssf_scale[name]
        del self.ssf_shift[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def weight(self) -> torch.Tensor | None:
        """The base weight, so code that inspects `layer.weight` (transformers, generation utils) still works."""
        return getattr(self.base_layer, "weight", None)

    def probe_input(self) -> torch.Tensor:
        p = next(self.base_layer.parameters(), None)
        dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
        return torch.randn(2, 4, self.in_features, device=device).to(dtype)

    def merge(self, name: str) -> None:
        if self.merged_adapters:
            self.unmerge()
        base = self.base_layer
        scale, shift = self.ssf_scale[name].detach().float(), self.ssf_shift[name].detach().float()
        weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
        kind = type(base).__name__
        if weight is None and not torch.all(scale == 1):
            raise PeftkitError(f"SSF cannot merge its scale into a {kind} without a weight; serve the adapter "
                               "unmerged.")
        if bias is None and not self.is_linear and torch.any(shift != 0):
            raise PeftkitError(
                f"SSF cannot merge into {kind}: the norm has no bias to take the learned shift β (max |β| = "
                f"{shift.abs().max().item():.3g}), and dropping it would change the model. Layers merged before this "
                "one stay merged (outputs unchanged; unmerge_adapter() undoes them). Serve the adapter unmerged, or "
                "train SSF on the linear layers only (target_modules: all-linear) to get a mergeable adapter."
            )
        self._saved = {"weight": weight.detach().clone() if weight is not None and torch.any(scale == 0) else None,
                       "bias": bias.detach().clone() if bias is not None else None}
        with torch.no_grad():
            if weight is not None:
                factor = scale if not self.is_linear or isinstance(base, Conv1D) else scale.unsqueeze(1)
                weight.copy_((weight.float() * factor).to(weight.dtype))
            if bias is not None:
                bias.copy_((bias.float() * scale + shift).to(bias.dtype))
            elif self.is_linear:  # a bias-free linear gets one: W x -> γ ⊙ W x + β
                base.bias = nn.Parameter(shift.to(weight.dtype).clone(), requires_grad=False)
        self.merged_adapters = [name]

    def unmerge(self) -> None:
        base = self.base_layer
        for name in self.merged_adapters:
            scale = self.ssf_scale[name].detach().float()
            weight = getattr(base, "weight", None)
            with torch.no_grad():
                if self._saved.get("weight") is not None:
                    weight.copy_(self._saved["weight"])
                elif weight is not None:
                    factor = scale if not self.is_linear or isinstance(base, Conv1D) else scale.unsqueeze(1)
                    weight.copy_((weight.float() / factor).to(weight.dtype))
                if self._saved.get("bias") is not None:
                    base.bias.copy_(self._saved["bias"])
                elif self.is_linear:
                    base.bias = None  # the bias merge created
        self._saved = {}
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.use_adapter:
            return result
        scale, shift = self.ssf_scale[self.active_adapter], self.ssf_shift[self.active_adapter]
        return (result.to(scale.dtype) * scale + shift).to(result.dtype)


@register
class Ssf(Method):
    """Per-feature scale and shift after every linear and norm layer."""

    name = "ssf"
    config_class = SsfConfig
    config: SsfConfig

    def attach(self) -> None:
        cfg = self.config
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        norms = {type(m) for m in self.model.modules() if norm_dim(m) is not None}
        types = (*LINEAR_TYPES, *norms)
        target = cfg.target_modules
        if target is None:  # every linear but the output head, and every norm: named, so the saved config re-finds them
            target = sorted({
                path.rsplit(".", 1)[-1] for path, m in self.model.named_modules()
                if path and m is not head and isinstance(m, types)
            })
        paths = find_targets(self.model, target, layers_to_transform=cfg.layers_to_transform,
                             layers_pattern=cfg.layers_pattern, types=types, exclude=cfg.modules_to_save)
        if cfg.target_modules is None:
            paths = [p for p in paths if self.model.get_submodule(p) is not head]
            cfg.target_modules = target
        for path in paths:
            module = self.wrap(path, SsfLayer)
            module.add(self.adapter_name)
        self.attach_modules_to_save()

    def notes(self) -> list[str]:
        layers = [layer for _, layer in self.layers() if isinstance(layer, SsfLayer)]
        norms = [layer for layer in layers if not layer.is_linear]
        lines = [f"SSF: {len(layers) - len(norms)} linear and {len(norms)} norm layers scaled and shifted."]
        linears = [layer for layer in layers if layer.is_linear and layer.base_layer.bias is None]
        if linears:
            lines.append(f"SSF: merging gives {len(linears)} bias-free linear layers a bias (β); a merged model saved "
                         "with save_pretrained keeps it only where the architecture has a bias option (Llama: "
                         "attention_bias, mlp_bias).")
        no_bias = sorted({type(n.base_layer).__name__ for n in norms if getattr(n.base_layer, "bias", None) is None})
        if no_bias:
            lines.append(f"SSF: {', '.join(no_bias)} has no bias, so a learned shift there cannot be merged into the "
                         "base weights; for a mergeable adapter set target_modules to all-linear.")
        return lines
