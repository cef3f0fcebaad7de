"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): learned keys and values in every attention layer.

Both learn, for each of P virtual tokens, a key and a value per layer and key/value head (grouped-query models get
fewer heads than queries, and the head dimension is the model's own). Prefix tuning trains them through an MLP
reparameterisation (Sec. 4.3: direct training is unstable), `prefix_projection: true`; only the MLP's output is kept.
P-tuning v2 trains them directly, starting by default (`prefix_init: vocab`) from the keys and values the model itself
computes for P random vocabulary tokens: Li & Liang (Sec. 7.2) find real-word activations a far better start than
random values, which on a pretrained model (smollm2-135m) first raise the loss from 2.6 to 9.7. Both save PEFT's
PREFIX_TUNING format: one tensor `prompt_embeddings` [P, num_layers * 2 * kv_heads * head_dim]. How the prefix enters
attention: virtual_tokens.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..settings import Setting
from .base import register
from .virtual_tokens import (
    ENCODER_HIDDEN_SIZE,
    NUM_VIRTUAL_TOKENS,
    Geometry,
    Prefix,
    PrefixSource,
    VirtualTokenConfig,
    VirtualTokenMethod,
    choice,
    record_prefix,
    split_prefix,
    vocab_embeddings,
)

PREFIX_INITS = ("vocab", "random")
PREFIX_INIT = Setting("prefix_init", str, "vocab", "Prefixes learned directly start as the model's keys and values "
                      "of random tokens (vocab) or as N(0, 1) (random).", choices=PREFIX_INITS)


@dataclasses.dataclass
class PrefixTuningConfig(VirtualTokenConfig):
    prefix_projection: bool = True
    encoder_hidden_size: int | None = None  # the MLP's width; None: the key/value width (PEFT's default)
    # without projection: vocab (the model's keys and values for random tokens) or random (N(0, 1), PEFT's)
    prefix_init: str = "vocab"

    method = "prefix_tuning"
    yaml_keys = (
        NUM_VIRTUAL_TOKENS,
        Setting("prefix_projection", bool, True, "Prefix tuning: learn the prefixes through an MLP."),
        ENCODER_HIDDEN_SIZE,
        PREFIX_INIT,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prefix_init = choice("prefix_init", self.prefix_init, PREFIX_INITS)

    def expected_shapes(self, geo: Geometry) -> dict[str, int]:
        # PEFT's convention for grouped-query models: token_dim and heads describe the key/value heads
        return {"token_dim": geo.kv_dim, "num_layers": geo.num_layers, "num_attention_heads": geo.num_kv_heads}

    def fill(self, geo: Geometry) -> None:
        super().fill(geo)
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = geo.kv_dim

    peft_type = "PREFIX_TUNING"  # P-tuning v2's too: PEFT's prefix tuning without the projection

    def to_peft(self) -> dict[str, Any]:
        return {**super().to_peft(), "prefix_projection": self.prefix_projection,
                "encoder_hidden_size": self.encoder_hidden_size, "init_weights": None}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> VirtualTokenConfig:
        """P-tuning v2's files too (the base class of the configs sharing a peft_type reads its files): a file
        without prefix_projection is P-tuning v2's; the MLP of one with it is not in the file, only its output."""
        values = cls.peft_fields(raw, where)
        if raw.get("prefix_projection"):
            return PrefixTuningConfig.loaded(where, **values, prefix_projection=True)
        return PTuningV2Config.loaded(where, **values)


@dataclasses.dataclass
class PTuningV2Config(PrefixTuningConfig):
    prefix_projection: bool = False

    method = "p_tuning_v2"
    yaml_keys = (NUM_VIRTUAL_TOKENS, PREFIX_INIT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefix_projection:
            raise ConfigError("p_tuning_v2 trains its prefixes directly; for the MLP reparameterisation use "
                              "finetuning_type: prefix_tuning.")


class PrefixValues(PrefixSource):
    """The prefix as one [P, num_layers * 2 * kv_dim] tensor, learned directly or as MLP(embedding)."""

    def __init__(self, config: PrefixTuningConfig, geo: Geometry) -> None:
        super().__init__()
        self.geo = geo
        self.num_virtual_tokens = p = config.num_virtual_tokens
        width = geo.num_layers * 2 * geo.kv_dim
        self.projection: nn.Sequential | None = None
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Parameter(torch.randn(p, geo.kv_dim))  # nn.Embedding's N(0, 1), as PEFT
            hidden = config.encoder_hidden_size
            self.projection = nn.Sequential(nn.Linear(geo.kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(p, width))

    def saved_values(self) -> torch.Tensor:
        return self.prompt_embeddings if self.projection is None else self.projection(self.embedding)

    def prefix(self, model: nn.Module) -> Prefix:
        return split_prefix(self.saved_values(), self.geo)


@register
class PrefixTuning(VirtualTokenMethod):
    name = "prefix_tuning"
    config_class = PrefixTuningConfig

    def make_source(self, geo: Geometry) -> PrefixSource:
        c = self.config
        direct = not c.prefix_projection and not c.inference_mode
        tokens = vocab_embeddings(self.model, c.num_virtual_tokens) if direct and c.prefix_init == "vocab" else None
        source = PrefixValues(c, geo)
        if tokens is not None:
            with torch.no_grad():
                device = self.model.get_input_embeddings().weight.device
                pairs = record_prefix(self.model, tokens.to(device))
                per_layer = torch.stack([t for pair in pairs for t in pair])  # [2 * layers, kv_heads, P, head_dim]
                source.prompt_embeddings.copy_(per_layer.permute(2, 0, 1, 3).reshape(c.num_virtual_tokens, -1))
        return source


@register
class PTuningV2(PrefixTuning):
    name = "p_tuning_v2"
    config_class = PTuningV2Config
