"""Learning-rate schedules equal transformers' step for step; training imports neither PEFT nor bitsandbytes, so a
run that quantizes nothing starts quietly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.optimization
from helpers import tiny_llama

from peftkit.errors import ConfigError
from peftkit.train.schedules import get_scheduler

ROOT = Path(__file__).resolve().parents[1]


def lrs(factory, name: str, **kwargs) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    scheduler = factory(name, optimizer, num_warmup_steps=3, num_training_steps=20, scheduler_specific_kwargs=kwargs)
    out = []
    for _ in range(25):  # past the end too
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("name, kwargs", [
    ("constant", {}), ("constant_with_warmup", {}), ("linear", {}), ("cosine", {}), ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", {}), ("cosine_with_restarts", {"num_cycles": 3}), ("polynomial", {}),
    ("polynomial", {"lr_end": 1e-5, "power": 2.0}),
])
def test_every_schedule_equals_transformers(name, kwargs) -> None:
    assert lrs(get_scheduler, name, **kwargs) == lrs(transformers.optimization.get_scheduler, name, **kwargs)


def test_bad_schedule_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="do not apply to lr_scheduler_type 'linear'"):
        lrs(get_scheduler, "linear", num_cycles=2)
    with pytest.raises(ConfigError, match="must be below the learning_rate"):
        lrs(get_scheduler, "polynomial", lr_end=1.0)


def test_an_unquantized_run_prints_nothing_about_kernels_or_bitsandbytes(tmp_path) -> None:
    from test_cli import save_word_tokenizer

    tiny_llama().save_pretrained(tmp_path / "model")
    save_word_tokenizer(tmp_path / "model")
    script = (
        "import sys; from peftkit.cli import main; "
        f"code = main(['train', 'model_name_or_path={tmp_path / 'model'}', 'dataset=identity', "
        f"'dataset_dir={ROOT / 'examples' / 'data'}', 'template=default', 'max_steps=2', 'max_samples=8', "
        f"'output_dir={tmp_path / 'out'}']); "
        "assert code == 0; assert 'bitsandbytes' not in sys.modules and 'peft' not in sys.modules, 'imported'"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"PEFTKIT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    printed = (done.stdout + done.stderr).lower()
    assert "kernels" not in printed and "bitsandbytes" not in printed
