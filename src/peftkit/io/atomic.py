"""Write files and folders so that a crash or an error never leaves half of one behind: write under a temporary
name beside the target, then rename (atomic on one filesystem).

Temporary names carry the writer's process id (`.NAME.tmp-PID-XXXX`), so the debris of a killed process can be told
from the work of a live one and removed (`remove_stale_temporaries`) instead of piling up for ever.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

# Ours: `.NAME.tmp-PID-XXXX`. Before process ids were recorded: `.NAME.tmp-XXXX` (folders), `.NAME.XXXX.tmp` (files).
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[^/]*")
_OLD_TEMP = re.compile(r"\.(?P<name>.+)\.(tmp-[^/]+|[^./]+\.tmp)")


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporaries for the target `name`."""
    return f".{name}.tmp-{os.getpid()}-"


def is_temporary(name: str) -> bool:
    return bool(_TEMP.fullmatch(name) or _OLD_TEMP.fullmatch(name))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete the temporaries in `folder` (only those for `target`, if given) whose writing process is gone.

    Returns what was removed. A temporary of a live process (another run writing here right now) is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = _TEMP.fullmatch(entry.name)
        old = None if m else _OLD_TEMP.fullmatch(entry.name)
        found = m or old
        if not found or (target is not None and found.group("name") != target):
            continue
        if m and _alive(int(m.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then move the result to `path`."""
    path = Path(path)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """`Path.write_text`, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new temporary folder in `parent` for the target `name`, readable by others like any folder (not 0700)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix(name)))
    tmp.chmod(0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; when the block succeeds it becomes `final`.

    An existing `final` is replaced, or with `keep_existing` kept (another process finished the same work first).
    Callers that replace must have checked that `final` may be deleted (io/outputs.py).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = temp_dir(final.parent, final.name)
    try:
        yield tmp
        if final.exists():
            if keep_existing:
                return
            _remove(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a folder by renaming it to a temporary first: a kill half-way leaves debris, never a folder that looks
    complete but lacks files (a checkpoint whose state file survived its weights)."""
    doomed = temp_dir(path.parent, path.name)
    os.replace(path, doomed / path.name)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a file or folder so that a kill part-way never leaves a half-deleted folder in its place."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        _remove(path)
    else:
        path.unlink(missing_ok=True)
