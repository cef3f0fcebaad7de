"""PPO's reward model, as LLaMA-Factory's `reward_model_type` names its kinds:

- `lora`: `reward_model` is a `stage: rm` output folder (a LoRA adapter and its value head) for the policy's own base
  model. The adapter joins the policy's model as a second, frozen adapter and is switched on to score: no second copy
  of the weights. (A policy that trains the base weights, or whose layers cannot take it, loads a copy instead.)
- `full`: `reward_model` is a model folder with its value head (`value_head.safetensors`), optionally with
  `reward_model_adapters` applied; loaded as a separate frozen model.
- `api`: `reward_model` is a URL. The texts (prompt + completion) are POSTed as `{"model": "model", "messages":
  [texts]}` and the reply's `{"scores": [...]}` read, LLaMA-Factory's protocol.

Each scores a sequence with the value head on the final hidden state of its last token, as `stage: rm` trained it.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from ..data.dataset import same_vocabulary
from ..errors import AdapterLoadError, ConfigError
from ..io.run_config import read_train_config
from ..models import load_model_and_tokenizer, load_tokenizer
from ..tuned import TunedModel
from .base import Batch
from .rm import VALUE_HEAD_NAME, load_value_head, model_hidden_size, scores

REWARD_ADAPTER = "reward"


class Scorer(Protocol):
    def __call__(self, batch: Batch, texts: Sequence[str]) -> torch.Tensor:
        """One score per sequence of `batch` (whose decoded texts are `texts`) [sequences], float32."""


class AdapterScorer:
    """The reward adapter on the policy's own model, switched on while scoring."""

    def __init__(self, tuned: TunedModel, head: nn.Linear) -> None:
        self.tuned, self.head = tuned, head

    @torch.no_grad()
    def __call__(self, batch: Batch, texts: Sequence[str]) -> torch.Tensor:
        active = self.tuned.active_adapter
        self.tuned.set_adapter(REWARD_ADAPTER)
        try:
            return scores(self.tuned, self.head, batch).float()
        finally:
            self.tuned.set_adapter(active)


class ModelScorer:
    """A separate frozen reward model."""

    def __init__(self, model: nn.Module, head: nn.Linear) -> None:
        self.model, self.head = model.eval(), head

    @torch.no_grad()
    def __call__(self, batch: Batch, texts: Sequence[str]) -> torch.Tensor:
        return scores(self.model, self.head, batch).float()


class ApiScorer:
    """Scores from a reward server over HTTP (LLaMA-Factory's protocol)."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.url, self.timeout = url, timeout

    def __call__(self, batch: Batch, texts: Sequence[str]) -> torch.Tensor:
        body = json.dumps({"model": "model", "messages": list(texts)}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                values = json.loads(reply.read())["scores"]
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"reward_model {self.url}: the reward server did not answer ({e}).") from None
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"reward_model {self.url}: the reply is not JSON with a `scores` list.") from None
        if not isinstance(values, list) or len(values) != len(texts):
            got = len(values) if isinstance(values, list) else repr(values)
            raise ConfigError(f"reward_model {self.url} returned {got} scores for {len(texts)} texts; it must return "
                              "one per text.")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)


def check_reward_tokenizer(folder: str, tokenizer: Any) -> None:
    """A reward model reads the policy's token ids: its tokenizer (saved beside it) must be the policy's."""
    if not any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return
    theirs = load_tokenizer(folder)
    if not same_vocabulary(theirs, tokenizer):
        raise ConfigError(f"reward_model '{folder}' has another tokenizer ({len(theirs)} tokens) than the policy "
                          f"({len(tokenizer)} tokens); PPO scores the policy's token ids with it. Train the reward "
                          "model on the same base model (or use reward_model_type: api, which reads text).")


def load_scorer(cfg: Any, tuned: TunedModel, tokenizer: Any) -> Scorer:
    """The reward model `cfg` names, ready to score the policy's samples."""
    kind, where = cfg.reward_model_type, cfg.reward_model
    if kind == "api":
        return ApiScorer(where)
    if not os.path.isdir(where):
        raise ConfigError(f"reward_model '{where}' is not a folder: give a `stage: rm` output folder "
                          f"(reward_model_type: {kind}).")
    heads_from = cfg.reward_model_adapters or where
    if not (Path(heads_from) / VALUE_HEAD_NAME).is_file():
        raise ConfigError(f"reward_model: {heads_from} has no {VALUE_HEAD_NAME}; it is not a reward model (train one "
                          "with stage: rm).")
    check_reward_tokenizer(heads_from, tokenizer)
    device = next(tuned.parameters()).device
    head = load_value_head(heads_from, model_hidden_size(tuned), device)
    if kind == "lora" and not tuned.method.in_place:
        try:
            tuned.load_adapter(where, REWARD_ADAPTER)
            return AdapterScorer(tuned, head)
        except AdapterLoadError as e:
            if "does not fit" not in str(e):
                raise
    return ModelScorer(_separate_model(cfg, kind, where, device, next(tuned.parameters()).dtype), head)


def _separate_model(cfg: Any, kind: str, where: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen copy: the reward model's base with its adapter (lora), or the folder's model (full)."""
    if kind == "lora":
        base = read_train_config(where).get("model_name_or_path") or cfg.model_name_or_path
        model, _ = load_model_and_tokenizer(base, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        model = TunedModel.load(model.to(device), where)
    else:
        model, _ = load_model_and_tokenizer(where, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        model = model.to(device)
        if cfg.reward_model_adapters:
            model = TunedModel.load(model, cfg.reward_model_adapters)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
