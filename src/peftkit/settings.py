"""What a YAML key is: its name, type, default, help, group and choices, declared once where the key belongs.

`TrainConfig`'s own keys declare theirs with `setting(...)`; a method or an objective lists `Setting`s in its config
class (`yaml_keys`), and `config.py` collects them into `TrainConfig`. Everything that shows or checks keys (the
YAML loader, the web UI's forms, the "not a key of this method" warning) reads them from here.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

# LLaMA-Factory's grouping of its web UI's training settings, plus the sections its YAML files use.
GROUPS = ("model", "method", "data", "basic", "extra", "evaluation", "output", "rlhf", "distributed", "generation",
          "export", "benchmark")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One YAML key. `field` names the config-class attribute it fills when that differs (LoRA's `lora_rank` is
    `LoraConfig.r`); `choices` lists the valid values of a string key."""

    name: str
    type: Any
    default: Any
    help: str
    group: str = "method"
    choices: tuple[str, ...] = ()
    field: str | None = None

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"Setting {self.name}: group {self.group!r} is not one of {GROUPS}")

    @property
    def target(self) -> str:
        return self.field or self.name

    def as_field(self) -> Any:
        """A dataclass field with this default (copied per instance when mutable) and the setting as metadata."""
        return setting(self.default, self.help, self.group, self.choices)


def setting(default: Any, help: str, group: str, choices: tuple[str, ...] = ()) -> Any:
    """Declare a dataclass field as a YAML key: `learning_rate: float = setting(5e-5, "peak rate", "basic")`."""
    meta = {"help": help, "group": group, "choices": tuple(choices)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def settings_of(cls: type, hints: dict[str, Any]) -> list[Setting]:
    """A config dataclass's fields that are YAML keys, as `Setting`s (`hints`: its resolved type hints)."""
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(Setting(f.name, hints[f.name], default, f.metadata["help"], f.metadata["group"],
                           f.metadata["choices"]))
    return out


def merge_declarations(declared: list[tuple[str, Setting]]) -> dict[str, tuple[Setting, list[str]]]:
    """(owner, setting) pairs -> name -> (the setting, its owners). A key that several methods read (lora_alpha,
    num_virtual_tokens) must be declared alike by each: one key, one type and one default in the YAML."""
    merged: dict[str, tuple[Setting, list[str]]] = {}
    for owner, s in declared:
        if s.name not in merged:
            merged[s.name] = (s, [owner])
            continue
        first, owners = merged[s.name]
        if (first.type, first.default, first.choices) != (s.type, s.default, s.choices):
            raise TypeError(f"YAML key {s.name} is declared differently by {owners[0]} and {owner}: "
                            f"{first.type}={first.default!r} vs {s.type}={s.default!r}; declare it once and share it.")
        owners.append(owner)
    return merged
