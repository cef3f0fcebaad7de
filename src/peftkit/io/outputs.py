"""Output folders (`output_dir`, `export_dir`): what peftkit may write over and what it may delete.

`overwrite_output_dir` is where a toolkit can destroy a user's files, so the rule is strict: a folder is cleared only
when every entry in it is something peftkit wrote (a name only peftkit writes such as `trainer_log.jsonl`, a
`checkpoint-N` folder, a temporary, or a name listed in the folder's marker file), and never when it is the working
directory, a folder above it, the home folder or the filesystem root, whatever it holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked against each other
    fcntl = None  # type: ignore[assignment]

from ..errors import ConfigError
from .atomic import is_temporary, remove_tree, write_text
from .run_config import RUN_CONFIG_NAME

# Lists the entries peftkit wrote into the folder (adapter, tokenizer, model shards, GGUF files, ...).
MARKER = ".peftkit-output.json"
LOCK_NAME = ".peftkit-lock"  # held by the training run writing into the folder
# What a launcher (the web UI) writes into output_dir before it starts `peftkit train` there: the run's own config and
# console output, which an overwrite of the folder keeps.
LAUNCH_NAMES = frozenset({"training_args.yaml", "running_log.txt"})
# Names only peftkit writes: a folder of them is a peftkit output even without a marker. Adapter, model and tokenizer
# files are not among them: a user's own model or adapter folder has the same names, and must never count as ours.
KNOWN_NAMES = frozenset({
    MARKER, RUN_CONFIG_NAME, "trainer_log.jsonl", "train_results.json", "training_loss.png",
    "generated_predictions.jsonl", "predict_results.json", "lora_drop.json", LOCK_NAME, *LAUNCH_NAMES,
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
            if entry.name not in LAUNCH_NAMES and entry.name != LOCK_NAME:
                remove_tree(entry)


@contextlib.contextmanager
def lock_output(path: str | os.PathLike, key: str = "output_dir") -> Iterator[None]:
    """Hold `path` for this run: another run into it is refused while this one lives. The OS releases the lock when
    the process ends, however it ends, so a killed run never leaves the folder locked."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+", encoding="utf-8") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise ConfigError(f"{key} '{folder}' is in use by another training run ({holder}); wait for it to "
                                  f"end, stop it, or choose another {key}.") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:  # the run has written everything: the folder is free again
            (folder / LOCK_NAME).unlink(missing_ok=True)


def output_in_use(path: str | os.PathLike) -> bool:
    """Whether a live training run holds `path` (see `lock_output`)."""
    lock = Path(path) / LOCK_NAME
    if fcntl is None or not lock.is_file():
        return False
    with open(lock, encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
