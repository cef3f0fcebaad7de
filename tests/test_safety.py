"""Nothing lost, nothing stale: overwrite only ever replaces peftkit's own output, a new run never mixes with an old
one's checkpoints, resume checks its settings and cuts the log back, stale temporaries go, bad files get one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_cfg, read_log, run, synthetic_examples, tiny_llama
from safetensors.torch import load_file, save_file
from test_cli import save_word_tokenizer
from transformers import AutoModelForCausalLM

from peftkit import LoraConfig, TunedModel
from peftkit.cli import main
from peftkit.config import load_config
from peftkit.data import SFTCollator
from peftkit.errors import AdapterLoadError, ConfigError
from peftkit.io.outputs import MARKER
from peftkit.train import Trainer
from peftkit.train.checkpoint import list_checkpoints


def lora() -> TunedModel:
    torch.manual_seed(0)
    return TunedModel(tiny_llama(initializer_range=0.3), LoraConfig(r=4, target_modules="all-linear"))


def plant(folder: Path) -> dict[Path, str]:
    """Unrelated files a user keeps in `folder`; returns them with their contents, to check they survive."""
    files = {folder / "notes.txt": "my notes", folder / "data" / "rows.json": "[]"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def survived(files: dict[Path, str]) -> bool:
    return all(path.is_file() and path.read_text() == text for path, text in files.items())


@pytest.fixture
def exportable(tmp_path) -> tuple[Path, Path]:
    """A saved tiny base model (with a tokenizer) and a LoRA adapter for it."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base)
    save_word_tokenizer(base)
    TunedModel(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4)).save(adapter)
    return base, adapter


def export(base: Path, adapter: Path, export_dir: str, *extra: str) -> int:
    return main(["export", f"model_name_or_path={base}", f"adapter_name_or_path={adapter}", f"export_dir={export_dir}",
                 *extra])


# --- 1. overwrite replaces only peftkit's own output ---
@pytest.mark.parametrize("where", ["cwd", "parent", "home"])
def test_export_overwrite_never_clears_the_working_directory_a_folder_above_it_or_home(
        exportable, tmp_path, monkeypatch, capsys, where) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = {"cwd": ".", "parent": "..", "home": str(tmp_path / "home")}[where]
    files = plant(Path(target))
    assert export(*exportable, target, "overwrite_output_dir=true") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {"cwd": "working directory", "parent": "above the working directory", "home": "home folder"}[where] in err
    assert survived(files)


def test_overwrite_refuses_a_folder_holding_files_peftkit_did_not_write(exportable, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    files = plant(out)
    assert export(*exportable, str(out), "overwrite_output_dir=true") == 1
    err = capsys.readouterr().err
    assert "did not write (data, notes.txt)" in err and survived(files)

    cfg = make_cfg(tmp_path, output_dir=str(out), overwrite_output_dir=True, max_steps=2)
    with pytest.raises(ConfigError, match="did not write"):
        run(cfg, synthetic_examples(8), lora())
    assert survived(files)


def test_overwrite_replaces_a_previous_export_and_a_previous_run(exportable, tmp_path) -> None:
    out = tmp_path / "merged"
    assert export(*exportable, str(out)) == 0
    marked = set(json.loads((out / MARKER).read_text())["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= marked
    assert export(*exportable, str(out), "overwrite_output_dir=true") == 0

    cfg = make_cfg(tmp_path, max_steps=2)
    run(cfg, synthetic_examples(8), lora())
    assert "adapter_model.safetensors" in json.loads((Path(cfg.output_dir) / MARKER).read_text())["files"]
    run(make_cfg(tmp_path, max_steps=2, overwrite_output_dir=True), synthetic_examples(8), lora())


def test_export_never_replaces_the_adapter_it_reads(exportable, capsys) -> None:
    base, adapter = exportable
    assert export(base, adapter, str(adapter), "overwrite_output_dir=true") == 1
    assert "which this export reads" in capsys.readouterr().err
    assert (adapter / "adapter_model.safetensors").is_file()


def test_output_and_export_dir_that_are_files_get_one_line(exportable, tmp_path, capsys) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert export(*exportable, str(a_file)) == 1
    assert "is an existing file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is an existing file"):
        run(make_cfg(tmp_path, output_dir=str(a_file), max_steps=1), synthetic_examples(4), lora())
    assert a_file.read_text() == "keep"


# --- 2. a new run never mixes with an old one ---
def test_a_fresh_run_refuses_an_output_dir_with_checkpoints_unless_overwriting(tmp_path) -> None:
    data = synthetic_examples(16)
    old = make_cfg(tmp_path, max_steps=8, save_steps=2)
    die_at(old, data, 5)
    assert [p.name for p in list_checkpoints(old.output_dir)] == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(ConfigError, match="holds an earlier run.*checkpoint-4"):
        run(make_cfg(tmp_path, max_steps=3, save_steps=2), data, lora())
    run(make_cfg(tmp_path, max_steps=3, save_steps=2, overwrite_output_dir=True), data, lora())
    assert [p.name for p in list_checkpoints(old.output_dir)] == ["checkpoint-2"]  # the new run's only


def die_at(cfg, data, step: int) -> None:
    """Train until `step`, then die as a killed process would (after that step's checkpoint, if any)."""
    class Killed(Exception):
        pass

    def die(at: int) -> None:
        if at == step:
            raise Killed

    trainer = Trainer(cfg, lora(), data, SFTCollator(pad_token_id=0))
    trainer.method.on_step_end = die
    with pytest.raises(Killed):
        trainer.train()


def test_pruning_keeps_this_runs_newest_checkpoints(tmp_path) -> None:
    data = synthetic_examples(16)
    cfg = make_cfg(tmp_path, max_steps=9, save_steps=2, save_total_limit=2)
    die_at(cfg, data, 5)
    out = Path(cfg.output_dir)
    other = out / "checkpoint-100"  # another run's checkpoint, with a higher step
    other.mkdir()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    (other / "trainer_state.json").write_text(json.dumps({**state, "global_step": 100, "run_id": "another"}))
    run(make_cfg(tmp_path, max_steps=9, save_steps=2, save_total_limit=2,
                 resume_from_checkpoint=str(out / "checkpoint-4")), data, lora())
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-8", "checkpoint-100"]


def test_resume_refuses_a_checkpoint_at_or_past_the_last_step(tmp_path) -> None:
    data = synthetic_examples(16)
    die_at(make_cfg(tmp_path, max_steps=8, save_steps=4), data, 6)
    adapter_before = list(Path(tmp_path / "out").glob("adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="at step 4, and this run has 4 steps in all: there is nothing left"):
        run(make_cfg(tmp_path, max_steps=4, resume_from_checkpoint=True, resume_allow_changes=True), data, lora())
    assert list(Path(tmp_path / "out").glob("adapter_model.safetensors")) == adapter_before == []


# --- 3. resume checks the settings ---
def test_resume_with_changed_settings_is_refused_unless_allowed(tmp_path) -> None:
    data = synthetic_examples(16)
    die_at(make_cfg(tmp_path, max_steps=6, save_steps=2), data, 3)
    changed = make_cfg(tmp_path, max_steps=6, save_steps=2, resume_from_checkpoint=True, learning_rate=1e-3, seed=8,
                       logging_steps=2)  # logging_steps does not change the result: not listed
    with pytest.raises(ConfigError) as refused:
        run(changed, data, lora())
    message = str(refused.value)
    assert "learning_rate: 0.01 -> 0.001; seed: 7 -> 8" in message and "logging_steps" not in message
    assert "resume_allow_changes: true" in message
    allowed = make_cfg(tmp_path, max_steps=6, save_steps=2, resume_from_checkpoint=True, learning_rate=1e-3,
                       resume_allow_changes=True)
    with pytest.warns(UserWarning, match="changed settings.*learning_rate: 0.01 -> 0.001"):
        run(allowed, data, lora())
    assert [e["step"] for e in read_log(allowed) if "loss" in e] == [1, 2, 3, 4, 5, 6]


def test_resume_compares_every_result_changing_key_of_the_config(tmp_path) -> None:
    """TrainConfig's keys: data, method keys, schedule and batch are compared; where logs go and how often are not."""
    from peftkit.train.checkpoint import TrainerState, check_resume

    base = load_config(None, model_name_or_path="m", dataset="identity").to_dict()
    for key, value in [("dataset", ["alpaca_en_demo"]), ("lora_rank", 16), ("cutoff_len", 512),
                       ("per_device_train_batch_size", 4), ("lr_scheduler_type", "cosine"), ("num_train_epochs", 5.0),
                       ("finetuning_type", "ia3"), ("template", "qwen")]:
        with pytest.raises(ConfigError, match=f"{key}: "):
            check_resume(Path("ckpt"), TrainerState(global_step=1), 10, base, {**base, key: value}, False)
    for key, value in [("output_dir", "elsewhere"), ("save_steps", 7), ("logging_steps", 3), ("plot_loss", True)]:
        check_resume(Path("ckpt"), TrainerState(global_step=1), 10, base, {**base, key: value}, False)


# --- 4. the log holds each step once ---
def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path) -> None:
    data = synthetic_examples(16)
    die_at(make_cfg(tmp_path, max_steps=6, save_steps=2), data, 3)
    cfg = make_cfg(tmp_path, max_steps=6, save_steps=2, resume_from_checkpoint=True)
    run(cfg, data, lora())
    assert [e["step"] for e in read_log(cfg)] == [1, 2, 3, 4, 5, 6]


# --- 6. the temporaries of killed writers go, a live writer's stay ---
def test_stale_temporaries_are_removed_and_a_live_writers_are_kept(exportable, tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        stale = [out / f".checkpoint-7.tmp-{dead.pid}-abc", out / ".checkpoint-3.tmp-x1y2",  # older naming
                 out / ".adapter_model.safetensors.k2j3.tmp", out / f".full-model.tmp-{dead.pid}-q"]
        kept = out / f".checkpoint-9.tmp-{live.pid}-abc"
        for path in [*stale, kept]:
            path.mkdir(parents=True) if "safetensors" not in path.name else path.write_bytes(b"half")
        run(make_cfg(tmp_path, max_steps=2), synthetic_examples(8), lora())
        assert not any(p.exists() for p in stale) and kept.is_dir()

        merged_debris = tmp_path / f".merged.tmp-{dead.pid}-zz"
        merged_debris.mkdir()
        assert export(*exportable, str(tmp_path / "merged")) == 0
        assert not merged_debris.exists()
    finally:
        live.kill()


# --- 10. damaged files and bad paths: one line each ---
def test_damaged_checkpoints_are_refused_with_the_way_out(tmp_path) -> None:
    data = synthetic_examples(16)
    die_at(make_cfg(tmp_path, max_steps=8, save_steps=2), data, 5)
    out = Path(tmp_path / "out")
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    resume = make_cfg(tmp_path, max_steps=8, save_steps=2, resume_from_checkpoint=True)
    with pytest.raises(ConfigError, match=r"checkpoint-4' is damaged: optimizer.pt cannot be read .*"
                                          r"resume_from_checkpoint=.*checkpoint-2"):
        run(resume, data, lora())
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, ')
    with pytest.raises(ConfigError, match="checkpoint-4' is damaged: trainer_state.json cannot be read"):
        run(resume, data, lora())


def test_a_missing_adapter_path_and_a_nan_adapter_are_refused(tmp_path, capsys) -> None:
    with pytest.raises(AdapterLoadError, match="'.*nowhere' does not exist"):
        TunedModel.load(tiny_llama(), tmp_path / "nowhere")
    tuned = lora()
    tuned.save(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(AdapterLoadError, match=f"'{key}' holds NaN or infinite values"):
        TunedModel.load(tiny_llama(), tmp_path / "adapter")
    assert main(["chat", "--model", "unused", "--adapter", str(tmp_path / "nowhere"), "--once", "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("steps", [-2, -100])
def test_negative_max_steps_other_than_minus_one_is_an_error(steps) -> None:
    with pytest.raises(ConfigError, match="max_steps must be"):
        load_config(None, model_name_or_path="m", dataset="d", max_steps=steps)
    assert load_config(None, model_name_or_path="m", dataset="d", max_steps=-1).max_steps == -1
