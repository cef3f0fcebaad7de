"""Sequence-level knowledge distillation (Kim & Rush, 2016): a teacher's `generated_predictions.jsonl` becomes an
alpaca dataset of its answers, registered in `dataset_info.json`, so a student learns them by an ordinary SFT run.

Each row's `messages` (written by `peftkit predict`) give the prompt back exactly: the last user turn is the
`instruction`, earlier turns the `history`, a system turn the `system`; peftkit's alpaca reader (formats._alpaca)
rebuilds the same conversation, with the teacher's answer as its last turn.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .sources import DatasetAttr, json_kind, load_registry, read_rows, write_dataset

# LLaMA-Factory's alpaca columns, under their default names
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
ANSWERS = ("predict", "label")  # the teacher's answer, or the dataset's own


@dataclasses.dataclass
class Converted:
    """What `predictions_to_alpaca` wrote."""

    path: Path
    entry: dict[str, Any]
    name: str
    written: int
    skipped: dict[str, int]  # reason -> rows


def describe_skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"


class _Skip(ValueError):
    """A row alpaca cannot hold; the message is the reason counted."""


def predictions_to_alpaca(pred_file: str | Path, output: str | Path, name: str | None = None,
                          use: str = "predict") -> Converted:
    """Write the rows of `pred_file` as an alpaca dataset `output` (.json array or .jsonl) whose answers are each
    row's `use` ("predict": the teacher's; "label": the dataset's own), and add/replace its entry `name` (default:
    the output's stem) in the dataset_info.json beside it."""
    pred_file, output = Path(pred_file), Path(output)
    if use not in ANSWERS:
        raise ConfigError(f"use must be one of {', '.join(ANSWERS)}, got {use!r}.")
    if output.suffix.lower() not in (".json", ".jsonl"):
        raise ConfigError(f"The output {output} must be a .json or .jsonl file (an alpaca dataset).")
    name = name or output.stem
    if not pred_file.is_file():
        raise ConfigError(f"Predictions file {pred_file} does not exist; write it with `peftkit predict`.")
    if pred_file.suffix.lower() not in (".json", ".jsonl"):
        raise ConfigError(f"Predictions file {pred_file} is not .jsonl; pass the generated_predictions.jsonl that "
                          "`peftkit predict` wrote.")
    registry = load_registry(output.parent) or {}  # read first: a broken dataset_info.json stops us before writing
    rows = read_rows(DatasetAttr(name=str(pred_file), files=[pred_file]))
    if not rows:
        raise ConfigError(f"Predictions file {pred_file} is empty.")
    dataset, skipped = [], collections.Counter()
    for i, row in enumerate(rows, 1):
        try:
            dataset.append(_alpaca_row(row, i, pred_file, use))
        except _Skip as e:
            skipped[str(e)] += 1
    if not dataset:
        raise ConfigError(f"{pred_file} has no row to convert (skipped: {describe_skips(skipped)}).")
    output.parent.mkdir(parents=True, exist_ok=True)
    entry = write_dataset(output, dataset, name, {"columns": dict(ALPACA_COLUMNS)}, registry)
    return Converted(output, entry, name, len(dataset), dict(skipped))


def _alpaca_row(row: Any, i: int, pred_file: Path, use: str) -> dict[str, Any]:
    """One prediction -> one alpaca row; a file that is not peftkit's predictions is an error, a row alpaca cannot
    hold a `_Skip`."""
    if not isinstance(row, dict):
        raise ConfigError(f"{pred_file}, row {i}, is {json_kind(row)}, not a JSON object.")
    if "messages" not in row:
        raise ConfigError(f"{pred_file} has no `messages` (row {i}); from-predictions needs a predictions file "
                          "written by `peftkit predict`, which records each prompt's messages.")
    answer = row.get(use)
    if not isinstance(answer, str):
        raise ConfigError(f"{pred_file}, row {i}, has no text under '{use}'.")
    if not answer.strip():
        raise _Skip(f"empty {use}")
    if row.get("tools"):
        raise _Skip("with tools (alpaca has no tools column; such rows need sharegpt)")
    messages = row["messages"]
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ConfigError(f"{pred_file}, row {i}: `messages` must be a list of {{\"role\", \"content\"}} texts.")
    has_system = bool(messages) and messages[0]["role"] == "system"
    system, turns = (messages[0]["content"], messages[1:]) if has_system else ("", messages)
    if any(m["role"] not in ("user", "assistant") for m in turns):
        raise _Skip("with tool turns (alpaca has none; such rows need sharegpt)")
    roles = [m["role"] for m in turns]
    if len(turns) % 2 != 1 or roles != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
        raise _Skip("whose turns do not alternate user/assistant ending on user")
    history = [[turns[j]["content"], turns[j + 1]["content"]] for j in range(0, len(turns) - 1, 2)]
    return {"instruction": turns[-1]["content"], "input": "", "output": answer, "system": system,
            "history": history}
