"""Runs as the web UI sees them: `peftkit` subprocesses it starts and stops, and the files runs leave behind.

The UI never trains in its own process: it starts the same command a person would type and reads what the run writes
(`trainer_log.jsonl`, checkpoints, results). So a run started from the browser is a run from the command line, and a
browser that closes loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from ..io.atomic import write_text
from ..train.checkpoint import list_checkpoints
from .form import PROCESS_LOG_NAME, dump, runnable

LOG_NAME = "trainer_log.jsonl"
# tqdm's training bar, e.g. "train:  40%|####      | 4/10 [00:02<00:03, ...]": the step between two log lines
_BAR = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def read_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """The run's log entries (train steps and evaluations); a line being written is skipped."""
    path = Path(output_dir) / LOG_NAME
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


@dataclasses.dataclass
class Progress:
    step: int = 0
    total: int = 0
    epoch: float | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None

    def describe(self) -> str:
        if not self.total:
            return "starting (loading the model and data)"
        parts = [f"step {self.step}/{self.total}"]
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch:.2f}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.0f} tokens/s")
        if self.eta_seconds is not None and self.step < self.total:
            parts.append(f"ETA {_duration(self.eta_seconds)}")
        return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def progress(entries: list[dict[str, Any]], console: str, elapsed: float | None) -> Progress:
    """Where a run is: the step from the progress bar (the log has a line every logging_steps only), the rest from
    the newest log line; the ETA from the pace since the process started."""
    p = Progress()
    bars = _BAR.findall(console)
    if bars:
        p.step, p.total = int(bars[-1][0]), int(bars[-1][1])
    train = [e for e in entries if "loss" in e]
    if train:
        last = train[-1]
        p.step = max(p.step, int(last.get("step", 0)))
        p.epoch, p.loss, p.tokens_per_second = last.get("epoch"), last.get("loss"), last.get("tokens_per_second")
    started = int(bars[0][0]) if bars else 0  # a resumed run's bar starts at its checkpoint
    if elapsed and p.total and p.step > started:
        p.eta_seconds = elapsed / (p.step - started) * (p.total - p.step)
    return p


def curves(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for a loss plot: (step, loss, series) with series "train" or "eval"."""
    rows = []
    for e in entries:
        if "loss" in e:
            rows.append({"step": e["step"], "loss": e["loss"], "series": "train"})
        if "eval_loss" in e:
            rows.append({"step": e["step"], "loss": e["eval_loss"], "series": "eval"})
    return rows


# --- past runs ---
@dataclasses.dataclass
class Run:
    path: Path
    config: dict[str, Any]
    results: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.path)


def find_runs(root: str | Path, depth: int = 5) -> list[Run]:
    """Runs under `root` (folders with a trainer log or a saved config), newest first."""
    root = Path(root).expanduser()
    found = []
    if not root.is_dir():
        return []
    for path in _folders(root, depth):
        if (path / LOG_NAME).is_file() or (path / "train_config.json").is_file():
            found.append(Run(path, _json(path / "train_config.json"), _json(path / "train_results.json")))
    return sorted(found, key=lambda r: _mtime(r.path), reverse=True)


def _folders(root: Path, depth: int) -> list[Path]:
    out = [root]
    if depth > 0:
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and not child.name.startswith("checkpoint-"):
                out += _folders(child, depth - 1)
    return out


def _mtime(path: Path) -> float:
    log = path / LOG_NAME
    return (log if log.exists() else path).stat().st_mtime


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# --- processes ---
class Job:
    """One `peftkit` command in a subprocess, its console output written to a file as it runs.

    `stop()` asks it to stop as Ctrl-C does (SIGINT): a training run finishes its step, saves a checkpoint and exits.
    """

    def __init__(self, command: list[str], log_path: str | Path, cwd: str | Path | None = None) -> None:
        self.command = command
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self._log = self.log_path.open("w", encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(runnable(command), stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                        start_new_session=True)  # a Ctrl-C in the UI's terminal is not the run's
        self._closer = threading.Thread(target=self._close_when_done, daemon=True)
        self._closer.start()

    def _close_when_done(self) -> None:
        self.process.wait()
        self._log.close()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def console(self) -> str:
        """Everything the command printed so far (progress bars' carriage returns as new lines)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
        except OSError:
            return ""

    def stop(self, timeout: float = 120.0) -> int | None:
        """Ask the command to stop (SIGINT) and wait for it; a second signal if it does not end in time."""
        if self.running:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGINT)  # the second Ctrl-C: stop at once
                self.process.wait(30)
        self._closer.join(5)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.wait(timeout)
        self._closer.join(5)
        return self.returncode


def process_log(output_dir: str | Path) -> Path:
    return Path(output_dir) / PROCESS_LOG_NAME


def start_command(command: str, document: dict[str, Any], root: str | Path) -> Job:
    """`peftkit <command> CONFIG` (predict, eval, export) with `document` written as CONFIG under <root>/.webui/,
    outside every output folder (an export refuses a folder holding files it did not write)."""
    folder = Path(root).expanduser() / ".webui"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.monotonic_ns() % 10**6:06d}"
    config = folder / f"{command}-{stamp}.yaml"
    write_text(config, dump(document))
    return Job(["peftkit", command, str(config)], folder / f"{command}-{stamp}.log")
