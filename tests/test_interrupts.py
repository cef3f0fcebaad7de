"""Killed or interrupted training loses nothing: `peftkit train` in a real process, stopped by Ctrl-C (SIGINT) or
SIGKILL at random moments, mid-checkpoint included, then resumed, ends with exactly the losses and adapter of an
uninterrupted run, each step once in the log and no temporary left behind."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)

from peftkit.io.atomic import is_temporary
from peftkit.train.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


def write_config(folder: Path, model_dir: Path) -> Path:
    config = {
        "model_name_or_path": str(model_dir), "finetuning_type": "lora", "lora_rank": 4, "lora_target": "all",
        "dataset": "identity", "dataset_dir": str(ROOT / "examples" / "data"), "cutoff_len": 64, "max_samples": 64,
        "output_dir": str(folder / "out"), "per_device_train_batch_size": 4, "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine", "warmup_steps": 2, "max_steps": STEPS, "save_steps": 2, "logging_steps": 1,
        "seed": 3,
    }
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(args: list[str], home: Path) -> subprocess.Popen:
    env = {**os.environ, "PEFTKIT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "peftkit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def logged_steps(out: Path) -> list[int]:
    path = out / "trainer_log.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written as we read
            pass
    return steps


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())}


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.01) -> bool:
    """Poll `condition` until it holds (True) or the process ends or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def reference(small_model_dir, smollm2_home, tmp_path_factory) -> Path:  # noqa: F811
    """The uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    proc = start(["train", str(write_config(folder, small_model_dir))], smollm2_home)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return folder / "out"


def assert_same_run(out: Path, reference: Path) -> None:
    assert logged_steps(out) == list(range(1, STEPS + 1))  # each step once
    assert losses(out) == losses(reference)  # exactly: a resumed run continues bit for bit
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert not [p.name for p in out.iterdir() if is_temporary(p.name)]


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_prints_the_resume_command(
        small_model_dir, smollm2_home, tmp_path, reference) -> None:  # noqa: F811
    config = write_config(tmp_path, small_model_dir)
    out = tmp_path / "out"
    proc = start(["train", str(config), "save_steps=100"], smollm2_home)  # no checkpoint would exist without Ctrl-C
    assert wait_until(lambda: len(logged_steps(out)) >= 5, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) == logged_steps(out)[-1] >= 5
    command = err.strip().splitlines()[-1]
    assert command == f"Resume with: peftkit train {config} save_steps=100 resume_from_checkpoint={checkpoints[0]}"

    resumed = start(shlex.split(command.removeprefix("Resume with: peftkit ")), smollm2_home)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_run(out, reference)


def test_a_second_signal_stops_at_once(small_model_dir, smollm2_home, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "out"
    proc = start(["train", str(write_config(tmp_path, small_model_dir)), "max_steps=100000"], smollm2_home)
    assert wait_until(lambda: len(logged_steps(out)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err


def test_five_kills_at_random_moments_then_resume_give_the_uninterrupted_run(
        small_model_dir, smollm2_home, tmp_path, reference) -> None:  # noqa: F811
    config = write_config(tmp_path, small_model_dir)
    out = tmp_path / "out"
    rng = random.Random(0)
    kills, mid_checkpoint = 0, False
    while kills < 5:
        args = ["train", str(config)] + (["resume_from_checkpoint=true"] if list_checkpoints(out) else [])
        resumed_at = int(list_checkpoints(out)[-1].name.split("-")[1]) if list_checkpoints(out) else 0
        proc = start(args, smollm2_home)
        if kills == 0:  # the first kill lands while a checkpoint is being written
            hit = wait_until(lambda: any(p.name.startswith(".checkpoint-") for p in out.glob(".*")), proc, poll=0.0005)
        else:  # the others: once this run has made progress, after a random pause
            hit = wait_until(lambda: max(logged_steps(out), default=0) > resumed_at + 1, proc)
            time.sleep(rng.uniform(0, 0.4))
        proc.kill()
        proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            mid_checkpoint |= kills == 1 and hit
        assert proc.returncode in (-signal.SIGKILL, 0)
        if proc.returncode == 0:  # it finished before the kill: nothing left to interrupt
            break
    assert kills == 5 and mid_checkpoint
    args = ["train", str(config)] + (["resume_from_checkpoint=true"] if list_checkpoints(out) else [])
    final = start(args, smollm2_home)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert_same_run(out, reference)
