"""GRPO's reward functions: built-in ones for verifiable answers, and any Python callable named by a dotted path.

A reward function takes the step's prompts and completions (text, one per completion; a prompt repeats for each of
its group's completions) and the dataset's other columns as keyword lists, TRL's convention:

    def my_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]

and returns one number per completion (None: no opinion; it counts as nothing in the weighted sum, as TRL's NaN).
Built-ins: `accuracy` (the completion's final answer equals the row's `answer` column), `format` (the completion
matches a regex, `reward_format_pattern`), `length` (0 within `reward_length_budget` tokens, down to -1 at twice it).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Any, Callable, Sequence

from ..errors import ConfigError

RewardFunc = Callable[..., Sequence[Any]]

DEFAULT_FORMAT = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The answer a completion gives: the content of its last <answer> tag or \\boxed{}, else its last number."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL) or re.findall(r"\\boxed\{([^{}]*)\}", text)
    if tagged:
        return tagged[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def same_answer(given: str | None, expected: Any) -> bool:
    """Equal as numbers when both are numbers (1,000 = 1000.0), else as stripped text."""
    if given is None or expected is None:
        return False
    a, b = given.strip().replace(",", ""), str(expected).strip().replace(",", "")
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return a == b


def accuracy(prompts: list[str], completions: list[str], answer: list[Any] | None = None, **_: Any) -> list[float]:
    """1 when the completion's final answer (see `final_answer`) equals the row's `answer` column, else 0."""
    if answer is None:
        raise ConfigError("reward function 'accuracy' compares with the dataset's `answer` column, and the rows have "
                          "none: add an `answer` column (the expected final answer) to the dataset.")
    return [float(same_answer(final_answer(c), a)) for c, a in zip(completions, answer)]


@dataclasses.dataclass
class FormatReward:
    """1 when the whole completion matches `pattern` (dot matches newlines), else 0."""

    pattern: str = DEFAULT_FORMAT

    def __post_init__(self) -> None:
        try:
            self.regex = re.compile(self.pattern, flags=re.DOTALL)
        except re.error as e:
            raise ConfigError(f"reward_format_pattern is not a valid regular expression ({e}).") from None

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [float(self.regex.match(c) is not None) for c in completions]


@dataclasses.dataclass
class LengthReward:
    """0 for a completion of at most `budget` tokens, then falling linearly to -1 at twice the budget (and below
    that, -1): a penalty for rambling that leaves short answers alone."""

    budget: int

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 **_: Any) -> list[float]:
        return [-min(max(len(ids) - self.budget, 0) / self.budget, 1.0) for ids in completion_ids]


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str  # what the logs call it: rewards/<name>
    func: RewardFunc
    weight: float


def load_rewards(names: Sequence[str], weights: Sequence[Any] | None, format_pattern: str,
                 length_budget: int) -> list[Reward]:
    """The reward functions `reward_funcs` names, with their `reward_weights` (default 1 each): a one-line error for a
    path that does not import or is not callable."""
    if not names:
        raise ConfigError("stage grpo needs reward_funcs: built-in accuracy, format or length, or dotted paths to "
                          "Python functions (e.g. reward_funcs: accuracy,format or my_rewards.correct).")
    if weights is not None and len(weights) != len(names):
        raise ConfigError(f"reward_weights has {len(weights)} values for {len(names)} reward_funcs; give one weight "
                          "per function.")
    out = []
    for i, name in enumerate(names):
        try:
            weight = 1.0 if weights is None else float(weights[i])
        except (TypeError, ValueError):
            raise ConfigError(f"reward_weights must be numbers, got {weights[i]!r}.") from None
        out.append(Reward(name.rsplit(".", 1)[-1], _function(name, format_pattern, length_budget), weight))
    if len({r.name for r in out}) < len(out):
        raise ConfigError(f"reward_funcs {', '.join(names)} repeat a name; each is logged as rewards/<name>.")
    return out


def _function(name: str, format_pattern: str, length_budget: int) -> RewardFunc:
    if name == "accuracy":
        return accuracy
    if name == "format":
        return FormatReward(format_pattern)
    if name == "length":
        if length_budget < 1:
            raise ConfigError(f"reward_length_budget must be at least 1 token, got {length_budget}.")
        return LengthReward(length_budget)
    module_name, _, attr = name.rpartition(".")
    if not module_name:
        raise ConfigError(f"reward function '{name}' is neither built in (accuracy, format, length) nor a dotted path "
                          "module.function to import.")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- whatever stops the import, say so in one line
        raise ConfigError(f"reward function '{name}': cannot import module '{module_name}' ({type(e).__name__}: {e}). "
                          "Check the path, and that its folder is on PYTHONPATH (or the working directory).") from None
    func = getattr(module, attr, None)
    if func is None or not callable(func):
        what = "has no" if func is None else "has a non-callable"
        raise ConfigError(f"reward function '{name}': module '{module_name}' {what} '{attr}'.")
    return func


def call_reward(reward: Reward, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                columns: dict[str, list[Any]]) -> list[float]:
    """One reward function's scores (None -> NaN), checked: one number per completion, or a one-line error."""
    out = reward.func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    try:
        out = list(out)
    except TypeError:
        raise ConfigError(f"reward function '{reward.name}' returned {type(out).__name__}, not a list of numbers "
                          "(one per completion).") from None
    if len(out) != len(completions):
        raise ConfigError(f"reward function '{reward.name}' returned {len(out)} values for {len(completions)} "
                          "completions; it must return one number per completion.")
    scores = []
    for v in out:
        if v is not None and (isinstance(v, (str, bytes)) or not hasattr(v, "__float__")):
            raise ConfigError(f"reward function '{reward.name}' returned {v!r} ({type(v).__name__}); rewards must be "
                              "numbers (or None).")
        scores.append(math.nan if v is None else float(v))
    return scores
