"""Reward functions the RL tests name by dotted path (tests/ is on sys.path while pytest runs)."""

from __future__ import annotations

import os


def letters(prompts, completions, **_):
    """The share of a completion's characters that are ASCII letters: a random byte-level policy writes ~20 %, and
    learns more in a few steps."""
    return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


def wrong_length(prompts, completions, **_):
    return [0.0] * (len(completions) + 1)


def not_a_number(prompts, completions, **_):
    return ["good"] * len(completions)


CALLS = {"n": 0}


def raises_on_call(prompts, completions, **kw):
    """letters, except that the call numbered $RL_RAISE_ON_CALL (1 = the probe before training) raises."""
    CALLS["n"] += 1
    if str(CALLS["n"]) == os.environ.get("RL_RAISE_ON_CALL"):
        raise RuntimeError("the grader crashed")
    return letters(prompts, completions, **kw)
