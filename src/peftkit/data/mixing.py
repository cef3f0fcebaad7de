"""Several training datasets -> one, by LLaMA-Factory's `mix_strategy`.

- `concat`: every example of each dataset, one dataset after the other (the trainer shuffles).
- `interleave_under`: draw a dataset for each example, by `interleave_probs` (or in turn without them), take its next
  example, and stop as soon as one dataset has given all of its examples: the others are undersampled.
- `interleave_over`: the same, but stop once every dataset has given all of its examples; one that runs out starts
  again from its first example, so the smaller ones are oversampled (repeated).

The draws are those of `datasets.interleave_datasets` (LLaMA-Factory calls it with these keys): the same seeded
generator, drawn in blocks of 1000, the same stopping rules. So a mix here holds the same rows in the same order as
LLaMA-Factory's for the same seed and dataset sizes (the tests check it against `datasets` itself).
"""

from __future__ import annotations

import logging
from typing import Sequence, TypeVar

import numpy as np

from ..errors import ConfigError

logger = logging.getLogger("peftkit.data")

MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")
_BLOCK = 1000  # datasets' draw size: the same blocks give the same sequence for a seed

T = TypeVar("T")


def interleave_order(lengths: Sequence[int], probs: Sequence[float] | None, seed: int, oversample: bool
                     ) -> list[tuple[int, int]]:
    """(dataset, row) pairs in the order an interleave takes them; a dataset's k-th draw takes its row k modulo its
    length."""
    n = len(lengths)
    if probs is None:  # in turn: the shortest's length rounds (under), or the longest's (over)
        rounds = max(lengths) if oversample else min(lengths)
        return [(d, r % lengths[d]) for r in range(rounds) for d in range(n)]
    drawable = [p > 0 for p in probs]
    if oversample and not all(drawable):
        zero = [d for d in range(n) if not drawable[d]]
        raise ConfigError(f"interleave_over stops once every dataset has given all its rows, but dataset(s) {zero} "
                          "have probability 0 and are never drawn; give them a probability above 0, or use "
                          "interleave_under.")
    rng = np.random.default_rng(seed)
    taken, order = [0] * n, []
    done = [not drawable[d] for d in range(n)]  # the datasets a stop waits for are only those that can be drawn
    while True:
        for d in rng.choice(n, size=_BLOCK, p=list(probs)).tolist():
            order.append((d, taken[d] % lengths[d]))
            taken[d] += 1
            if taken[d] == lengths[d]:
                done[d] = True
                if not oversample or all(done):
                    return order


def check_mixing(strategy: str, probs: Sequence[float] | None, names: Sequence[str] | None) -> list[float] | None:
    """LLaMA-Factory's rules, before any work: a known strategy; interleave_probs numbers, only with an interleave, one
    per dataset (when the datasets are known), none negative, summing to 1. Returns the probabilities as floats."""
    if strategy not in MIX_STRATEGIES:
        raise ConfigError(f"mix_strategy '{strategy}' is not one of: {', '.join(MIX_STRATEGIES)}.")
    if probs is None:
        return None
    try:
        probs = [float(p) for p in probs]
    except ValueError:
        raise ConfigError(f"interleave_probs must be numbers, got {list(probs)!r}.") from None
    if strategy == "concat":
        raise ConfigError("interleave_probs is set but mix_strategy is concat, which takes every row of every "
                          "dataset; set mix_strategy: interleave_under or interleave_over, or remove interleave_probs.")
    if names and len(probs) != len(names):
        raise ConfigError(f"interleave_probs has {len(probs)} numbers for {len(names)} datasets "
                          f"({', '.join(names)}); give one per dataset.")
    if any(p < 0 for p in probs):
        raise ConfigError(f"interleave_probs must not be negative, got {probs}.")
    if abs(sum(probs) - 1) > 1e-6:
        raise ConfigError(f"interleave_probs must sum to 1, got {probs} (sum {sum(probs):g}).")
    return probs


def mix(parts: Sequence[tuple[str, list[T]]], strategy: str, probs: Sequence[float] | None, seed: int
        ) -> tuple[list[T], dict[str, int]]:
    """The mixed examples and how many each dataset contributed (repeats counted)."""
    names = [name for name, _ in parts]
    check_mixing(strategy, probs, names)
    if strategy == "concat":
        mixed = [e for _, examples in parts for e in examples]
        counts = {name: len(examples) for name, examples in parts}
    else:
        order = interleave_order([len(e) for _, e in parts], probs, seed, strategy == "interleave_over")
        mixed = [parts[d][1][r] for d, r in order]
        counts = dict.fromkeys(names, 0)
        for d, _ in order:
            counts[names[d]] += 1
    return mixed, counts


def describe_mix(strategy: str, counts: dict[str, int], available: dict[str, int]) -> str:
    """One line per dataset: the rows it gave the run, their share, and how that compares with what it has."""
    total = max(sum(counts.values()), 1)
    lines = [f"{strategy}: {sum(counts.values())} training examples"]
    for name, n in counts.items():
        have = available[name]
        how = "all" if n == have else f"{n / have:.2f}x of its {have}"
        lines.append(f"  {name}: {n} ({100 * n / total:.1f}%; {how})")
    return "\n".join(lines)
