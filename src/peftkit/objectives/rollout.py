"""What the RL stages (ppo, grpo) share: prompts in, sampled completions out, laid out as training sequences.

Completions come from the current policy through the serving engine's decode loop (serve/decode.py): every prompt of a
step (and every copy of it, for GRPO's groups) in one batch with the KV cache, left-padded, each row leaving the batch
at its stop token; prefix methods' virtual tokens work there as in chat. Each row samples with its own generator,
seeded by (seed, step, rank, row), so a step draws the same completions whatever ran before it: a resumed run repeats
an uninterrupted one exactly.

A completion keeps the stop token that ended it (the policy chose to stop, and learns from that choice); its text,
for reward functions, is decoded without it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from ..data import get_template
from ..data.templates import IGNORE_INDEX
from ..errors import ConfigError
from ..fused_ops import fused_layers
from ..serve import decode
from ..serve.chat import stop_token_ids
from ..serve.fast_layers import FastLayers
from .base import Batch
from .reference import reference_of
from .sequences import token_outputs

PROMPT_IDS, COLUMNS = "prompt_ids", "columns"  # a prompt batch's fields (data.packing.PromptCollator)


@dataclasses.dataclass
class Rollout:
    """A step's samples: prompt and completion ids per sample, the completions' text, the rows' columns."""

    prompts: list[list[int]]
    completions: list[list[int]]  # generated ids, the stop token kept when one ended the row
    texts: list[str]
    finished: list[bool]  # ended by a stop token, not cut at max_new_tokens
    columns: list[dict[str, Any]]
    seconds: float  # spent generating

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def column_lists(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows' columns as keyword lists for reward functions (a column some rows lack is None there)."""
    names = dict.fromkeys(k for row in rows for k in row)
    return {k: [row.get(k) for row in rows] for k in names}


def on_device_of(batch: Batch, model: nn.Module) -> Batch:
    """`batch` on the device of `model`'s parameters."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def seed_for(seed: int, step: int, row: int) -> int:
    """The sampling seed of one row of one step (and rank): independent of everything that ran before."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return ((((seed * 1_000_003) + step) * 1_009 + rank) * 1_000_003 + row) % (2**62)


class Sampler:
    """Generates completions with the policy and lays samples out as training sequences."""

    def __init__(self, cfg: Any) -> None:
        self.template_name, self.enable_thinking = cfg.template, cfg.enable_thinking
        self.max_new_tokens, self.seed = cfg.max_new_tokens, cfg.seed
        # TRL's defaults where the run sets none: temperature 1, no top-p or top-k cut
        self.sampling = {"do_sample": True, "temperature": 1.0 if cfg.temperature is None else cfg.temperature,
                         "top_p": 1.0 if cfg.top_p is None else cfg.top_p, "top_k": cfg.top_k or 0}
        if self.sampling["temperature"] <= 0:
            raise ConfigError(f"stage {cfg.stage} samples its completions: temperature must be greater than 0, got "
                              f"{cfg.temperature}.")
        self.tokenizer: Any = None
        self.template: Any = None
        self.layout: Callable[[list[dict]], Batch] | None = None
        self.tokens, self.seconds = 0, 0.0  # the run's sampled (training) rollouts so far
        # the chat engine's decode-time linear products for the rollouts, prepared once for the run (a weight the
        # optimizer changed is prepared again)
        self.layers = FastLayers()

    def bind(self, tokenizer: Any, layout: Callable[[list[dict]], Batch]) -> None:
        if tokenizer is None:
            raise ConfigError("The RL stages need the run's tokenizer (to read completions); pass it to the Trainer.")
        self.tokenizer, self.layout = tokenizer, layout
        self.template = get_template(self.template_name, tokenizer, enable_thinking=self.enable_thinking)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[list[int]], columns: Sequence[dict[str, Any]], step: int,
                 sample: bool = True) -> Rollout:
        """One completion per prompt, all in one decode batch; greedy when not `sample` (an evaluation, left out of
        the rollout totals `results` reports). The model is put in eval mode for the generation (no dropout), and back
        in the mode it was in."""
        if self.tokenizer is None:
            raise RuntimeError("Sampler.bind() was not called; the Trainer binds the objective before training.")
        if not decode.supports(model):
            raise ConfigError(f"{type(model).__name__} cannot generate through peftkit's decode loop (a decoder-only "
                              "transformers model is needed) for the RL stages.")
        stops = frozenset(stop_token_ids(self.template, self.tokenizer, model))
        processors, _ = decode.processors(self.sampling if sample else {"do_sample": False}, GenerationConfig())
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(stops)
        rows = [decode.Row(list(p), self.max_new_tokens, stops, processors if sample else [], sample,
                           seed_for(self.seed, step, i)) for i, p in enumerate(prompts)]
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            decode.Decoder(model, self.tokenizer, pad, self.layers).run(rows)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        texts, finished = [], []
        if sample:
            self.tokens += sum(len(r.tokens) for r in rows)
            self.seconds += seconds
        for r in rows:
            ended = bool(r.tokens) and r.tokens[-1] in stops
            finished.append(ended)
            texts.append(self.tokenizer.decode(r.tokens[:-1] if ended else r.tokens, skip_special_tokens=True))
        return Rollout([list(p) for p in prompts], [list(r.tokens) for r in rows], texts, finished, list(columns),
                       seconds)

    def results(self) -> dict[str, Any]:
        """What train_results.json reports of the run's rollouts."""
        return {"rollout_tokens": self.tokens, "rollout_seconds": round(self.seconds, 3),
                "rollout_tokens_per_second": round(self.tokens / max(self.seconds, 1e-9), 2)}

    def prompt_texts(self, prompts: Sequence[list[int]]) -> list[str]:
        return [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]

    def sequences(self, prompts: Sequence[list[int]], completions: Sequence[list[int]]) -> Batch:
        """Prompt + completion per sample, labels on the completion: a training batch in the run's layout."""
        if self.layout is None:
            raise RuntimeError("Sampler.bind() was not called; the Trainer binds the objective before training.")
        return self.layout([{"input_ids": list(p) + list(c), "labels": [IGNORE_INDEX] * len(p) + list(c)}
                            for p, c in zip(prompts, completions)])


@torch.no_grad()
def frozen_token_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per label token log-probs of `model` on `batch`, without a graph (an old policy's, a reference's), through the
    kernels the training step runs (`fused_ops.fused_layers`: attention, norms, MLP), so that they equal the step's
    own to the bit until the policy moves."""
    with fused_layers(model):
        return token_outputs(model, batch).logps.detach()


def reference_token_logps(policy: nn.Module | None, reference: nn.Module | None, batch: Batch) -> torch.Tensor:
    """Per label token log-probs of the reference (`reference.reference_of`), detached. Grad mode is left as the
    caller has it, as for the preference stages' reference: nothing in the reference requires gradients, so no graph
    is recorded; it runs the training step's kernels (`fused_ops.fused_layers`), also between steps (a rollout), so
    the policy's log-ratio to it is exactly 0 until the policy moves."""
    with reference_of(policy, reference) as model, fused_layers(model):
        return token_outputs(model, batch).logps.detach()


def per_sequence(values: torch.Tensor, sequence: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Per-token values split by sequence (tokens are in sequence order)."""
    lengths = torch.bincount(sequence, minlength=count).tolist()
    return list(torch.split(values, lengths))
