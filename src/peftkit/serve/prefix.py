"""Prompts' keys and values kept between requests, so a prompt that begins as an earlier one did (the chat template's
system prompt, the turns before in a conversation, a few-shot header) prefills only what follows (vLLM's automatic
prefix caching).

Why: in `peftkit api` with 8 clients on smollm2-135m, prefills took ~20% of the batch's time, and ~30 of a chat
prompt's ~41 tokens are the template's system prompt, the same in every request.

What a reused prefix gives: the keys and values of those positions as an earlier forward computed them. Causal
attention makes a position's keys and values depend only on the tokens up to it and on the model, so they are the
ones the whole prompt's prefill would compute, up to the summation order of a product over a different number of
rows (as batching changes it: greedy tokens part only at near-ties).

Kept per scope: the model and its state, its tensors (identity, storage, version counter) and its adapter layers'
switches (active adapter, disabled, merged), so a server's adapters each reuse their own, and a change to any tensor
(an optimizer step between rollouts, an adapter merged or loaded) drops the model's entries at its next use.
PEFTKIT_PREFIX_CACHE sets the budget in MiB (0: off).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from typing import Sequence

import torch

from ..errors import ConfigError
from ..methods.base import AdapterLayer

ENV = "PEFTKIT_PREFIX_CACHE"  # MiB of keys and values kept for all scopes together; "0": no prefix reuse
DEFAULT_MIB = 256
MAX_ENTRIES = 256  # a bound on the prompts compared with each new one (a tiny model's would fit by the thousand)


def budget_from_env() -> int:
    """The budget in bytes that PEFTKIT_PREFIX_CACHE asks for (default DEFAULT_MIB MiB)."""
    text = os.environ.get(ENV, "").strip()
    try:
        mib = float(text) if text else DEFAULT_MIB
    except ValueError:
        raise ConfigError(f"{ENV} must be a number of MiB (0 turns prefix reuse off), got '{text}'.") from None
    return max(0, int(mib * 2**20))


@dataclasses.dataclass(eq=False)
class Entry:
    """One prompt's keys and values: per layer (keys, values), each [kv heads, positions, head dim]."""

    tokens: torch.Tensor  # [positions] int64
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


def _state(model: torch.nn.Module) -> tuple[tuple, tuple]:
    """What a prompt's keys and values depend on besides its tokens: (every parameter and buffer: its identity,
    storage and version counter, which in-place changes bump; every adapter layer's switches: active adapter,
    disabled, merged, LoRA scaling, and the training flag)."""
    tensors, switches = [], [model.training]
    for module in model.modules():
        for t in itertools.chain(module._parameters.values(), module._buffers.values()):
            if t is not None:  # a buffer made in inference mode (dynamic RoPE's) has no version: its identity counts
                tensors.append((id(t), t.data_ptr(), -1 if t.is_inference() else t._version))
        if isinstance(module, AdapterLayer):
            scaling = getattr(module, "scaling", None)
            switches.append((module.active_adapter, module.disabled, tuple(module.merged_adapters),
                             tuple(sorted(scaling.items())) if isinstance(scaling, dict) else None))
    return tuple(tensors), tuple(switches)


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    """The length of the longest common prefix of two 1-D token tensors."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """Prompts' keys and values, least recently used dropped first beyond `budget` bytes or MAX_ENTRIES prompts (all
    scopes together)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget_from_env() if budget is None else budget
        self.entries: collections.OrderedDict[int, tuple[int, Entry]] = collections.OrderedDict()  # oldest first
        self.scopes: dict[tuple, int] = {}  # (model id, tensors, switches) -> scope number
        self.numbers = itertools.count()  # scope numbers, never reused
        self.nbytes = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def scope(self, model: torch.nn.Module) -> int:
        """The scope under which `model`'s prompts are kept as it is now. Scopes of the same model with other
        tensors (it was trained, merged into, or given new adapters) go with their entries: they can no longer be
        used. Those with the same tensors and other switches (another adapter active) stay for when it switches
        back."""
        tensors, switches = _state(model)
        key = (id(model), tensors, switches)
        number = self.scopes.get(key)
        if number is not None:
            return number
        stale = {n for (model_id, t, _), n in self.scopes.items() if model_id == id(model) and t != tensors}
        if stale:
            self.scopes = {k: n for k, n in self.scopes.items() if n not in stale}
            for entry_key in [k for k, (n, _) in self.entries.items() if n in stale]:
                self._remove(entry_key)
        number = self.scopes[key] = next(self.numbers)
        return number

    def match(self, scope: int, prompts: Sequence[list[int]]) -> list[tuple[int, Entry | None]]:
        """For each prompt, (how many of its leading tokens have keys and values kept under `scope`, the entry
        holding them)."""
        entries = [(key, entry) for key, (n, entry) in self.entries.items() if n == scope]
        out: list[tuple[int, Entry | None]] = []
        for prompt in prompts:
            tokens = torch.tensor(prompt, dtype=torch.long)
            best, best_key, best_entry = 0, None, None
            for key, entry in entries:
                if int(entry.tokens[0]) == prompt[0] and (n := _common(entry.tokens, tokens)) > best:
                    best, best_key, best_entry = n, key, entry
            if best_key is not None:
                self.entries.move_to_end(best_key)
            out.append((best, best_entry))
        return out

    def keep(self, scope: int, prompt: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `prompt`'s keys and values (`layers`: per layer [kv heads, len(prompt), head dim], not shared with
        the running cache) under `scope`. Entries that are a prefix of it go: it covers them."""
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.budget:
            return
        tokens = torch.tensor(prompt, dtype=torch.long)
        for key, (n, entry) in list(self.entries.items()):
            if n != scope:
                continue
            common = _common(entry.tokens, tokens)
            if common == len(tokens):  # already covered (by this prompt or a longer one)
                self.entries.move_to_end(key)
                return
            if common == len(entry.tokens):
                self._remove(key)
        entry = Entry(tokens, layers, nbytes)
        self.entries[id(entry)] = (scope, entry)
        self.nbytes += nbytes
        while self.nbytes > self.budget or len(self.entries) > MAX_ENTRIES:
            self._remove(next(iter(self.entries)))

    def _remove(self, key: int) -> None:
        _, entry = self.entries.pop(key)
        self.nbytes -= entry.nbytes


def plan(prompts: Sequence[list[int]], matched: Sequence[int]) -> tuple[list[int], int]:
    """How many leading positions of each prompt to take from kept keys and values, and the common number of
    positions to prefill after them: every prompt keeps at least its last token to compute (its first new token's
    logits come from it), and all prefill the same number S of positions, a prompt shorter than S left-padded, so
    the batch's cache has no gap between a row's kept and computed positions."""
    usable = [min(m, len(p) - 1) for p, m in zip(prompts, matched)]
    width = max(len(p) - m for p, m in zip(prompts, usable))
    return [max(0, len(p) - width) for p in prompts], width
