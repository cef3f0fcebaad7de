"""LoRA (Hu et al. 2021), with rsLoRA scaling (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

A target layer W gets a low-rank update: y = W x + s * B A x, with A [r, in], B [out, r] and s = alpha / r
(rsLoRA: alpha / sqrt(r)). DoRA splits the updated weight into magnitude and direction:
W' = m * (W + s B A) / ||W + s B A||, the norm taken per output feature and m a learned vector.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterLoadError, ConfigError
from ..settings import Setting
from .base import (
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_TARGET,
    AdapterLayer,
    LinearAdapterLayer,
    Method,
    MethodConfig,
    check_lora_scaling,
    find_targets,
    register,
)

BIAS_MODES = ("none", "all", "lora_only")
# Parameters that get no weight decay, as transformers' Trainer (and LLaMA-Factory's LoRA+ optimizer) decide it.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
# PEFT config keys that change the math and that peftkit does not implement yet: loading must not silently ignore them
# (AdaLoRA's config, a LoraConfig in PEFT, checks them too). Key -> its neutral value.
UNSUPPORTED_PEFT_KEYS: dict[str, Any] = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "layer_replication": None,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
}
# LoraConfig's fields that PEFT's LoraConfig has too
_PEFT_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "init_lora_weights",
                "fan_in_fan_out", "target_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
                "task_type")


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    loraplus_lr_ratio: float | None = None  # LoRA+: lora_B learns at learning_rate x this; training only, not saved
    loraplus_lr_embedding: float = 1e-6  # LoRA+: learning rate of embedding LoRA's B

    method = "lora"
    yaml_keys = (
        Setting("lora_rank", int, 8, "Rank of the update matrices: more rank, more trainable parameters.", field="r"),
        LORA_ALPHA, LORA_DROPOUT, LORA_TARGET,
        Setting("use_rslora", bool, False, "Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_rank)."),
        Setting("use_dora", bool, False, "DoRA: learn each output row's magnitude apart from its direction."),
        Setting("loraplus_lr_ratio", float | None, None,
                "LoRA+: lora_B learns at learning_rate x this (the paper uses 16). Empty: plain LoRA."),
        Setting("loraplus_lr_embedding", float, 1e-6, "LoRA+: the learning rate of an embedding LoRA's B."),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"lora_rank must be at least 1 (LoRA's rank r: a positive integer), got {self.r!r}.")
        check_lora_scaling(self.lora_alpha, self.lora_dropout)
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}.")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights must be true, false or 'gaussian', got {self.init_lora_weights!r}.")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise ConfigError(f"loraplus_lr_ratio must be greater than 0 (the LoRA+ paper uses 16; values >= 1 make "
                              f"lora_B learn faster than lora_A), got {self.loraplus_lr_ratio!r}.")
        if not self.loraplus_lr_embedding > 0:
            raise ConfigError(f"loraplus_lr_embedding must be greater than 0 (default 1e-6), "
                              f"got {self.loraplus_lr_embedding!r}.")

    # --- PEFT's LORA format: LoRA+ and LoRA-drop adapters are plain LoRA at inference and save as it ---
    peft_type = "LORA"
    peft_tensor_names = (
        (".lora_A", ".lora_A.weight"),
        (".lora_B", ".lora_B.weight"),
        (".lora_emb_A", ".lora_embedding_A"),
        (".lora_emb_B", ".lora_embedding_B"),
        (".lora_magnitude", ".lora_magnitude_vector"),
    )

    def to_peft(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _PEFT_FIELDS}, "alpha_pattern": {}, "loftq_config": {},
                "megatron_config": None, "megatron_core": "megatron.core", "rank_pattern": {}}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> LoraConfig:
        """Always a plain LoraConfig (LoRA-drop's and LoRA+'s settings only shape training, and are not saved)."""
        for key, neutral in UNSUPPORTED_PEFT_KEYS.items():
            if raw.get(key, neutral) not in (neutral, None, {}, False):
                raise AdapterLoadError(f"{where} uses PEFT's '{key}' ({raw[key]!r}), "
                                       "which peftkit does not support yet.")
        values = {k: raw[k] for k in _PEFT_FIELDS if k in raw and raw[k] is not None}
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = sorted(values["target_modules"])
        if values.get("init_lora_weights") not in (True, False, "gaussian"):
            values["init_lora_weights"] = True  # only affects initialisation, which loading overwrites
        return LoraConfig(**values)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLayer(AdapterLayer):
    """Shared bookkeeping of the linear and embedding variants; tensors live in one ParameterDict per role.

    Each variant gives its base weight as [out, in] through `_base_weight` / `_set_base_weight`.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA only
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._merged_norms: dict[str, torch.Tensor] = {}  # DoRA norms at merge time, to unmerge exactly

    def _holders(self) -> dict[str, nn.ParameterDict]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_magnitude": self.lora_magnitude}

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {key: holder[name] for key, holder in self._holders().items() if name in holder}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def delete_adapter(self, name: str) -> None:
        for holder in (*self._holders().values(), self.lora_dropout):
            if name in holder:
                del holder[name]
        self.scaling.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that inspects `layer.weight` (transformers, generation utils) still works."""
        return self.base_layer.weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in [out, in] layout and fp32."""
        return (self.lora_B[name] @ self.lora_A[name]).float() * self.scaling[name]

    def _dora_scale(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """m / ||W + delta|| per output feature, detached from the graph as the DoRA paper recommends (Sec. 4.3)."""
        norm = torch.linalg.norm(self._base_weight().float() + delta, dim=1).detach()
        return self.lora_magnitude[name].float() / norm

    def _init_magnitude(self, name: str) -> None:
        with torch.no_grad():
            norm = torch.linalg.norm(self._base_weight().float() + self.delta_weight(name), dim=1)
        self.lora_magnitude[name] = nn.Parameter(norm)

    def merge(self, name: str) -> None:
        if self.merged_adapters:
            self.unmerge()
        delta = self.delta_weight(name)
        w = self._base_weight().float()
        if name in self.lora_magnitude:
            norm = torch.linalg.norm(w + delta, dim=1)
            self._merged_norms[name] = norm
            merged = (self.lora_magnitude[name].float() / norm).unsqueeze(1) * (w + delta)
        else:
            merged = w + delta
        self._set_base_weight(merged)
        self.merged_adapters = [name]

    def unmerge(self) -> None:
        for name in self.merged_adapters:
            w = self._base_weight().float()
            if name in self.lora_magnitude:
                w = w / (self.lora_magnitude[name].float() / self._merged_norms.pop(name)).unsqueeze(1)
            self._set_base_weight(w - self.delta_weight(name))
        self.merged_adapters = []


class LoraLinear(LoraLayer, LinearAdapterLayer):
    """LoRA on nn.Linear or GPT-2's Conv1D (fan_in_fan_out: weight stored [in, out])."""

    def add(self, name: str, cfg: LoraConfig) -> None:
        device = self.base_layer.weight.device
        A = torch.empty(cfg.r, self.in_features, device=device)
        B = torch.zeros(self.out_features, cfg.r, device=device)
        if cfg.init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / cfg.r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's default, as PEFT does
        if cfg.init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling
        if cfg.use_dora:
            self._init_magnitude(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.use_adapter:
            return result
        name = self.active_adapter
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        dropout = self.lora_dropout[name]
        if name not in self.lora_magnitude and self.training and result.dtype == torch.bfloat16:
            # Training on a bf16 base: the low-rank product runs in bf16 too, from the fp32 parameters (the
            # optimizer's master copy) cast per forward, r x d elements, instead of casting the activations to fp32
            # and back: 1.2x the step speed with LoRA on every linear layer (docs/performance.md, "casts").
            # Inference keeps the fp32 product, as PEFT computes it.
            return result + F.linear(F.linear(dropout(x), A.to(result.dtype)), (B * s).to(result.dtype))
        h = dropout(x.to(A.dtype))
        if name not in self.lora_magnitude and self.training and result.dtype == A.dtype:
            # Training in the adapter's dtype (fp32): the scaling and the sum in the up-projection's own product
            # (addmm), where `* s` and `+` were two more passes over the layer's output forward and one backward.
            # The down-projection as A @ h^T ([tokens, r] in column-major order) and B^T as a contiguous r x out copy:
            # in these layouts MKL runs the rank-r products 1.5-4x faster forward and backward than in F.linear's
            # (docs/performance.md, "LoRA's rank-r products in MKL's faster layouts").
            down = (A @ h.reshape(-1, h.shape[-1]).t()).t()
            return torch.addmm(result.reshape(-1, result.shape[-1]), down, B.t().contiguous(),
                               alpha=s).view(result.shape)
        lora = F.linear(F.linear(h, A), B) * s
        if name not in self.lora_magnitude:
            return result + lora.to(result.dtype)
        # DoRA: y = (m/||W'||) * (W x + s B A x) + bias, written as a correction on top of the base output.
        scale = self._dora_scale(name, self.delta_weight(name).detach())
        if isinstance(dropout, nn.Identity) or not self.training:
            base_out = result.to(A.dtype)
            if self.base_layer.bias is not None:
                base_out = base_out - self.base_layer.bias.to(A.dtype)
        else:
            base_out = F.linear(h, self._base_weight().to(A.dtype))
        return result + ((scale - 1) * base_out + scale * lora).to(result.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: A [r, vocab] is looked up like an embedding table, B [dim, r] maps it up."""

    def add(self, name: str, cfg: LoraConfig) -> None:
        vocab, dim = self.base_layer.weight.shape
        device = self.base_layer.weight.device
        A = torch.zeros(cfg.r, vocab, device=device)
        B = torch.empty(dim, cfg.r, device=device)
        nn.init.normal_(B)  # A is zero instead of B, as in PEFT, so lookups start as a no-op but get gradients
        if cfg.init_lora_weights is False:
            nn.init.normal_(A)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Identity()
        self.scaling[name] = cfg.scaling
        if cfg.use_dora:
            self._init_magnitude(name)

    def _holders(self) -> dict[str, nn.ParameterDict]:
        return {"lora_emb_A": self.lora_A, "lora_emb_B": self.lora_B, "lora_magnitude": self.lora_magnitude}

    def probe_input(self) -> torch.Tensor:
        return torch.randint(0, self.base_layer.num_embeddings, (2, 8), device=self.base_layer.weight.device)

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight.T  # [dim, vocab]: "output features" are the embedding dimensions

    def _set_base_weight(self, w_out_in: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_layer.weight.copy_(w_out_in.T.to(self.base_layer.weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.use_adapter:
            return result
        name = self.active_adapter
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        emb = self.base_layer
        after_a = F.embedding(x, A.T, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse)
        lora = (after_a @ B.T) * s
        if name not in self.lora_magnitude:
            return result + lora.to(result.dtype)
        scale = self._dora_scale(name, self.delta_weight(name).detach())
        return (result.to(A.dtype) * scale + scale * lora).to(result.dtype)


@register
class Lora(Method):
    """Low-rank adapters on linear and embedding layers."""

    name = "lora"
    config_class = LoraConfig
    config: LoraConfig

    def attach(self) -> None:
        cfg = self.config
        paths = find_targets(
            self.model,
            cfg.target_modules,
            layers_to_transform=cfg.layers_to_transform,
            layers_pattern=cfg.layers_pattern,
            exclude=cfg.modules_to_save,
        )
        if cfg.target_modules is None:  # record what the architecture default resolved to, as PEFT does
            cfg.target_modules = sorted({p.rsplit(".", 1)[-1] for p in paths})
        for path in paths:
            module = self.wrap(path, LoraLayer,
                               lambda m: LoraEmbedding(m) if isinstance(m, nn.Embedding) else LoraLinear(m))
            if isinstance(module, LoraLinear) and module.fan_in_fan_out:
                cfg.fan_in_fan_out = True
            module.add(self.adapter_name, cfg)
        self._train_biases()
        self.attach_modules_to_save()

    def _bias_params(self) -> dict[str, nn.Parameter]:
        if self.config.bias == "all":
            return {n: p for n, p in self.model.named_parameters() if n.endswith("bias") and "lora_" not in n}
        if self.config.bias == "lora_only":
            return {
                f"{path}.base_layer.bias": layer.base_layer.bias
                for path, layer in self.layers()
                if isinstance(layer, LoraLayer) and getattr(layer.base_layer, "bias", None) is not None
            }
        return {}

    def _train_biases(self) -> None:
        for p in self._bias_params().values():
            p.requires_grad_(True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **self._bias_params()}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns at lr x loraplus_lr_ratio, since with A and B at one
        rate feature learning is inefficient in wide models. Groups as LLaMA-Factory's LoRA+ optimizer: embedding LoRA's
        B at loraplus_lr_embedding, its A with the linear A's; biases and norm weights without weight decay. Unlike
        LLaMA-Factory and PEFT, other 1-D tensors (DoRA magnitudes, biases) stay at lr: the paper speeds up B only.
        """
        ratio = self.config.loraplus_lr_ratio
        if ratio is None:
            return super().param_groups(lr)
        linear_b: set[int] = set()
        embedding_b: set[int] = set()
        for _, layer in self.layers():
            if isinstance(layer, LoraLayer):
                B = layer.lora_B[self.adapter_name]
                (embedding_b if isinstance(layer, LoraEmbedding) else linear_b).add(id(B))
        no_decay = {id(p) for path, module in self.model.named_modules() for name, p in module.named_parameters(
            recurse=False) if isinstance(module, nn.LayerNorm) or _NO_DECAY.search(f"{path}.{name}".lower())}
        groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "no_decay": [], "lora_B": [], "lora_embedding_B": []}
        seen: set[int] = set()
        for _, p in self.trainable_parameters():
            if id(p) in seen:  # a tensor shared by several layers goes into the optimizer once
                continue
            seen.add(id(p))
            key = ("lora_embedding_B" if id(p) in embedding_b else "lora_B" if id(p) in linear_b
                   else "no_decay" if id(p) in no_decay else "lora_A")  # "lora_A": A and all else at lr
            groups[key].append(p)
        settings: dict[str, dict[str, float]] = {
            "lora_A": {"lr": lr},  # first, so the trainer logs the base learning rate
            "no_decay": {"lr": lr, "weight_decay": 0.0},
            "lora_B": {"lr": lr * ratio},
            "lora_embedding_B": {"lr": self.config.loraplus_lr_embedding},
        }
        return [{"name": key, "params": params, **settings[key]} for key, params in groups.items() if params]

    def notes(self) -> list[str]:
        cfg = self.config
        if cfg.loraplus_lr_ratio is None:
            return []
        return [f"LoRA+: lora_B learns at {cfg.loraplus_lr_ratio:g} x learning_rate, embedding LoRA's B at "
                f"{cfg.loraplus_lr_embedding:g}"]
