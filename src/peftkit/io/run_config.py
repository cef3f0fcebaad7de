"""`train_config.json`: the settings of the run that wrote a folder (a final adapter or a checkpoint).

Resume compares it with the new config, export and chat read the template and quantization an adapter was trained
with; every reader goes through here, so the file name and its tolerance of damage are decided once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_text

RUN_CONFIG_NAME = "train_config.json"


def read_train_config(folder: str | os.PathLike | None) -> dict[str, Any]:
    """The settings of the run that wrote `folder`, or {} when it has no readable record."""
    path = Path(folder) / RUN_CONFIG_NAME if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def write_train_config(folder: str | os.PathLike, settings: dict[str, Any]) -> None:
    write_text(Path(folder) / RUN_CONFIG_NAME, json.dumps(settings, indent=2, default=str) + "\n")
