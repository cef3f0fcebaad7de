"""Output folders (`output_dir`, `export_dir`): what peftkit may write over and what it may delete.

`overwrite_output_dir` is where a toolkit can destroy a user's files, so the rule is strict: a folder is cleared only
when every entry in it is something peftkit wrote (a name only peftkit writes such as `trainer_log.jsonl`, a
`checkpoint-N` folder, a temporary, or a name listed in the folder's marker file), and never when it is the working
directory, a folder above it, the home folder or the filesystem root, whatever it holds.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError
from .atomic import is_temporary, remove_tree, write_text
from .run_config import RUN_CONFIG_NAME

# Lists the entries peftkit wrote into the folder (adapter, tokenizer, model shards, GGUF files, ...).
MARKER = ".peftkit-output.json"
# Names only peftkit writes: a folder of them is a peftkit output even without a marker. Adapter, model and tokenizer
# files are not among them: a user's own model or adapter folder has the same names, and must never count as ours.
KNOWN_NAMES = frozenset({
    MARKER, RUN_CONFIG_NAME, "trainer_log.jsonl", "train_results.json", "training_loss.png",
    "generated_predictions.jsonl", "predict_results.json", "lora_drop.json",
})
_CHECKPOINT = re.compile(r"checkpoint-\d+")


def recorded(folder: Path) -> set[str]:
    """The names the folder's marker says peftkit wrote (empty when there is no readable marker)."""
    try:
        names = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str)}


def record_outputs(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Add `names` (entries of `folder` that peftkit just wrote) to the folder's marker."""
    folder = Path(folder)
    files = sorted(recorded(folder) | {n for n in names if n != MARKER})
    write_text(folder / MARKER, json.dumps({"written_by": "peftkit", "files": files}, indent=1) + "\n")


def written_by_peftkit(entry: Path, marked: set[str]) -> bool:
    name = entry.name
    return name in KNOWN_NAMES or name in marked or is_temporary(name) or (
        entry.is_dir() and _CHECKPOINT.fullmatch(name) is not None)


def check_not_a_file(path: str | os.PathLike, key: str) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} '{path}' is an existing file, not a folder; choose a folder path.")
    return path


def protected_place(path: str | os.PathLike) -> str | None:
    """What `path` is, when it is a place no output may replace: the working directory, a folder above it, the
    home folder or the filesystem root."""
    where = Path(path).resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if where == cwd:
        return "the working directory"
    if where in cwd.parents:
        return "a folder above the working directory"
    if where == home:
        return "the home folder"
    return "the filesystem root" if where == Path(where.anchor) else None


def check_overwritable(path: str | os.PathLike, key: str) -> None:
    """Refuse, with the reason, to clear a folder that is not a previous peftkit output or is a dangerous place."""
    path = check_not_a_file(path, key)
    if not path.exists():
        return
    place = protected_place(path)
    if place:
        raise ConfigError(f"{key} '{path}' is {place}; overwrite_output_dir never clears it. Choose a folder of its "
                          f"own (e.g. {key}=saves/run).")
    marked = recorded(path)
    foreign = sorted(e.name for e in path.iterdir() if not written_by_peftkit(e, marked))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"{key} '{path}' holds files peftkit did not write ({shown}); overwrite_output_dir only "
                          "replaces a previous peftkit output. Choose another folder, or move or delete those files "
                          "yourself.")


def clear_output(path: str | os.PathLike, key: str) -> None:
    """Delete a previous peftkit output's entries (after `check_overwritable`), keeping the folder itself."""
    path = Path(path)
    check_overwritable(path, key)
    if path.is_dir():
        for entry in path.iterdir():
            remove_tree(entry)
