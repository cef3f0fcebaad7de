"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): learned input embeddings of P virtual tokens.

Prompt tuning learns the P embeddings themselves. P-tuning produces them with a prompt encoder (an MLP, or a
bidirectional LSTM and an MLP) over learned inputs, which trains more stably; only the encoder's output is saved
(PEFT's `prompt_embeddings`), so a loaded P-tuning adapter is a fixed prompt. How the embeddings reach the model
without lengthening its input: virtual_tokens.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models import load_tokenizer
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
    vocab_embeddings,
)

PROMPT_INITS = ("random", "vocab", "text")
_PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # PEFT's PromptTuningInit names
ENCODERS = ("mlp", "lstm")


@dataclasses.dataclass
class PromptTuningConfig(VirtualTokenConfig):
    # random: N(0, 1) as PEFT; vocab: embeddings of random vocabulary tokens; text: of `prompt_tuning_init_text`.
    # vocab is the default: Lester et al. (Sec. 3.2, Fig. 3b) find random init clearly worse for small models.
    prompt_tuning_init: str = "vocab"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None  # for the text init; TrainConfig fills in the model's

    method = "prompt_tuning"
    yaml_keys = (
        NUM_VIRTUAL_TOKENS,
        Setting("prompt_tuning_init", str, "vocab", "Start the prompt from random vectors, the embeddings of random "
                "vocabulary tokens, or those of prompt_tuning_init_text.", choices=PROMPT_INITS),
        Setting("prompt_tuning_init_text", str | None, None, "prompt_tuning_init: text starts from this phrase."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = choice("prompt_tuning_init", self.prompt_tuning_init, PROMPT_INITS)
        if self.prompt_tuning_init == "text" and not self.prompt_tuning_init_text and not self.inference_mode:
            raise ConfigError("prompt_tuning_init: text needs prompt_tuning_init_text, the phrase whose token "
                              "embeddings start the prompt (e.g. 'Answer the question truthfully:').")

    peft_type = "PROMPT_TUNING"

    def to_peft(self) -> dict[str, Any]:
        return {**super().to_peft(), "prompt_tuning_init": _PEFT_INITS[self.prompt_tuning_init],
                "prompt_tuning_init_text": self.prompt_tuning_init_text,
                "tokenizer_name_or_path": self.tokenizer_name_or_path, "tokenizer_kwargs": None}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> VirtualTokenConfig:
        values = cls.peft_fields(raw, where)
        init = {v: k for k, v in _PEFT_INITS.items()}.get(str(raw.get("prompt_tuning_init", "RANDOM")).upper())
        return cls.loaded(where, **values, prompt_tuning_init=init or "random",
                          prompt_tuning_init_text=raw.get("prompt_tuning_init_text") or None,
                          tokenizer_name_or_path=raw.get("tokenizer_name_or_path"))


@dataclasses.dataclass
class PTuningConfig(VirtualTokenConfig):
    encoder_reparameterization_type: str = "mlp"  # mlp | lstm
    encoder_hidden_size: int | None = None  # None: the model's hidden size (PEFT's default)
    encoder_num_layers: int = 2  # LSTM layers; the MLP always has PEFT's three linear layers
    encoder_dropout: float = 0.0  # between LSTM layers

    method = "p_tuning"
    yaml_keys = (
        NUM_VIRTUAL_TOKENS,
        Setting("encoder_reparameterization_type", str, "mlp", "P-tuning: the prompt encoder.", choices=ENCODERS),
        ENCODER_HIDDEN_SIZE,
        Setting("encoder_num_layers", int, 2, "P-tuning: LSTM layers (the MLP always has three linear layers)."),
        Setting("encoder_dropout", float, 0.0, "P-tuning: dropout between LSTM layers."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = choice("encoder_reparameterization_type",
                                                      self.encoder_reparameterization_type, ENCODERS)
        if self.encoder_num_layers < 1 or not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError("encoder_num_layers must be >= 1 and encoder_dropout in [0, 1).")

    peft_type = "P_TUNING"

    def to_peft(self) -> dict[str, Any]:
        return {**super().to_peft(), "encoder_reparameterization_type": self.encoder_reparameterization_type.upper(),
                "encoder_hidden_size": self.encoder_hidden_size, "encoder_num_layers": self.encoder_num_layers,
                "encoder_dropout": self.encoder_dropout}

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> VirtualTokenConfig:
        """Only the encoder's output is in the file: the loaded adapter is that fixed prompt."""
        return cls.loaded(where, **cls.peft_fields(raw, where),
                          encoder_reparameterization_type=raw.get("encoder_reparameterization_type") or "mlp")

    def fill(self, geo: Geometry) -> None:
        super().fill(geo)
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = geo.hidden_size


class PromptEmbeddings(PrefixSource):
    """P learned input embeddings [P, hidden]."""

    needs_model = True

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.num_virtual_tokens = initial.shape[0]
        self.prompt_embeddings = nn.Parameter(initial.float())

    def saved_values(self) -> torch.Tensor:
        return self.prompt_embeddings

    def prefix(self, model: nn.Module) -> Prefix:
        return record_prefix(model, self.saved_values())


class PromptEncoder(PromptEmbeddings):
    """P-tuning's encoder over P learned inputs (PEFT's layer sizes, so the parameter count matches its report)."""

    def __init__(self, config: PTuningConfig) -> None:
        nn.Module.__init__(self)
        p, dim, hidden = config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size
        self.num_virtual_tokens = p
        self.embedding = nn.Parameter(torch.randn(p, dim))  # nn.Embedding's N(0, 1), as PEFT
        self.lstm: nn.LSTM | None = None
        if config.encoder_reparameterization_type == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers, bidirectional=True,
                                dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0,
                                batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim))

    def saved_values(self) -> torch.Tensor:
        x = self.embedding[None]
        if self.lstm is not None:
            x = self.lstm(x)[0]
        return self.mlp(x)[0]


@register
class PromptTuning(VirtualTokenMethod):
    name = "prompt_tuning"
    config_class = PromptTuningConfig

    def make_source(self, geo: Geometry) -> PrefixSource:
        c = self.config
        if c.inference_mode:
            return PromptEmbeddings(torch.zeros(c.num_virtual_tokens, geo.hidden_size))
        if c.prompt_tuning_init == "random":
            return PromptEmbeddings(torch.randn(c.num_virtual_tokens, geo.hidden_size))
        if c.prompt_tuning_init == "vocab":
            return PromptEmbeddings(vocab_embeddings(self.model, c.num_virtual_tokens))
        table = self.model.get_input_embeddings().weight.detach()
        ids = torch.tensor(self._text_ids(), device=table.device)
        return PromptEmbeddings(table[ids].float().cpu())

    def _text_ids(self) -> list[int]:
        """The init text's token ids, repeated or cut to num_virtual_tokens."""
        c = self.config
        if not c.tokenizer_name_or_path:
            raise ConfigError("prompt_tuning_init: text needs tokenizer_name_or_path (the base model's name or "
                              "folder) to turn prompt_tuning_init_text into tokens.")
        ids = load_tokenizer(c.tokenizer_name_or_path)(c.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("prompt_tuning_init_text tokenizes to nothing; give a non-empty phrase.")
        return (ids * -(-c.num_virtual_tokens // len(ids)))[: c.num_virtual_tokens]


@register
class PTuning(VirtualTokenMethod):
    name = "p_tuning"
    config_class = PTuningConfig

    def make_source(self, geo: Geometry) -> PrefixSource:
        c = self.config
        if c.inference_mode:
            return PromptEmbeddings(torch.zeros(c.num_virtual_tokens, geo.hidden_size))
        return PromptEncoder(c)
