"""Multi-phase recipes (`phases:`): each phase continues from the previous one's weights into output_dir/phase-N, the
last one's result lands in output_dir, and a recipe stopped mid-phase resumes at that phase and step, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import save_chat_model
from safetensors.torch import load_file

from peftkit import ConfigError
from peftkit.cli import main
from peftkit.config import Recipe, load_recipe
from peftkit.train import trainer as trainer_module

ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("recipe") / "model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("recipe_data")
    info = {}
    for name, n in (("math", 24), ("chat", 32)):
        rows = [{"instruction": f"{name} question {i}", "output": f"{name} answer {i * 7 % 13}"} for i in range(n)]
        (folder / f"{name}.json").write_text(json.dumps(rows))
        info[name] = {"file_name": f"{name}.json"}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def write_recipe(folder: Path, model_dir: Path, data_dir: Path, out: Path, phases: list[dict], **shared) -> Path:
    values = dict(model_name_or_path=str(model_dir), dataset_dir=str(data_dir), finetuning_type="lora",
                  lora_rank=4, lora_target="all", cutoff_len=64, per_device_train_batch_size=4,
                  learning_rate=5e-3, logging_steps=1, save_steps=2, seed=3, output_dir=str(out), padding_free=False,
                  **shared, phases=phases)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


TWO_PHASES = [
    {"dataset": "math", "max_steps": 3},
    {"dataset": "chat,math", "mix_strategy": "interleave_under", "interleave_probs": [0.75, 0.25], "max_steps": 4,
     "learning_rate": 2e-3},
]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / ADAPTER)


def log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


def test_phase_two_continues_phase_ones_adapter(model_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "dmt"
    path = write_recipe(tmp_path, model_dir, data_dir, out, TWO_PHASES)
    assert main(["train", str(path)]) == 0
    one, two = adapter(out / "phase-1"), adapter(out / "phase-2")
    assert one.keys() == two.keys() and any(not torch.equal(one[k], two[k]) for k in one)  # phase 2 trained

    # The same two runs by hand: phase 1, then phase 2 with adapter_name_or_path = phase 1's folder.
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and [c.max_steps for c in recipe.phases] == [3, 4]
    assert recipe.phases[1].learning_rate == 2e-3 and recipe.phases[0].learning_rate == 5e-3
    manual = tmp_path / "manual"
    common = [f"model_name_or_path={model_dir}", f"dataset_dir={data_dir}", "lora_rank=4", "lora_target=all",
              "cutoff_len=64", "per_device_train_batch_size=4", "logging_steps=1", "save_steps=2", "seed=3",
              "padding_free=false"]
    assert main(["train", "/dev/null", *common, "dataset=math", "max_steps=3", "learning_rate=5e-3",
                 f"output_dir={manual / '1'}"]) == 0
    assert main(["train", "/dev/null", *common, "dataset=chat,math", "mix_strategy=interleave_under",
                 "interleave_probs=[0.75,0.25]", "max_steps=4", "learning_rate=2e-3",
                 f"adapter_name_or_path={manual / '1'}", f"output_dir={manual / '2'}"]) == 0
    by_hand = adapter(manual / "2")
    assert all(torch.equal(two[k], by_hand[k]) for k in two)  # phase 2 started from phase 1's tensors

    # The last phase's result is the recipe's: output_dir holds it, and results list every phase.
    assert all(torch.equal(t, adapter(out)[k]) for k, t in two.items())
    results = json.loads((out / "train_results.json").read_text())
    assert [p["phase"] for p in results["phases"]] == [1, 2] and results["train_steps"] == 4
    assert (out / "adapter_config.json").is_file() and not (out / "checkpoint-2").exists()
    assert [e["step"] for e in log(out / "phase-2") if "loss" in e] == [1, 2, 3, 4]  # a fresh schedule

    # Run again: refused (an earlier recipe), unless overwritten.
    assert main(["train", str(path)]) == 1
    assert main(["train", str(path), "overwrite_output_dir=true", "max_steps=1"]) == 0
    steps = [json.loads((out / f"phase-{i}" / "train_results.json").read_text())["train_steps"] for i in (1, 2)]
    assert steps == [1, 1]


class Killed(Exception):
    pass


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_kill_in_phase_two_resumes_there_exactly(model_dir, data_dir, tmp_path, monkeypatch, capsys, dtype) -> None:
    """In both dtypes of the base weights, whichever this CPU would pick (PEFTKIT_DTYPE forces it)."""
    monkeypatch.setenv("PEFTKIT_DTYPE", dtype)
    whole = tmp_path / "whole"
    main(["train", str(write_recipe(tmp_path, model_dir, data_dir, whole, TWO_PHASES))])

    cut = tmp_path / "cut"
    path = write_recipe(tmp_path, model_dir, data_dir, cut, TWO_PHASES)
    save = trainer_module.Trainer._save_checkpoint

    def save_then_die(self, only_model=None):
        saved = save(self, only_model)
        if self.output_dir.name == "phase-2" and self.state.global_step == 2:
            raise Killed  # everything after phase 2's checkpoint-2 is lost, as in a kill
        return saved

    monkeypatch.setattr(trainer_module.Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        main(["train", str(path)])
    monkeypatch.setattr(trainer_module.Trainer, "_save_checkpoint", save)
    assert (cut / "phase-2" / "checkpoint-2").is_dir() and not (cut / "phase-2" / ADAPTER).exists()
    phase_one = adapter(cut / "phase-1")
    assert main(["train", str(path), "resume_from_checkpoint=true"]) == 0
    printed = capsys.readouterr().out
    assert "Phase 1 of 2: done earlier" in printed and "Phase 2 of 2: resuming" in printed
    assert all(torch.equal(phase_one[k], t) for k, t in adapter(cut / "phase-1").items())  # not trained again
    a, b = adapter(whole), adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[e["loss"] for e in log(folder / "phase-2") if "loss" in e] for folder in (whole, cut)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.mark.parametrize("phases,message", [
    ([{"dataset": "math", "output_dir": "x"}], r"phases\[1\] sets output_dir"),
    ([{"dataset": "math"}, {"lora_rank": 8}], r"phases\[2\] sets lora_rank"),
    ([{"dataset": "math"}, {"finetuning_type": "full"}], r"phases\[2\] sets finetuning_type"),
    ([], "non-empty list of mappings"),
    (["math"], "non-empty list of mappings"),
    ([{"dataset": "math"}, {"learning_rate": -1}], r"phases\[2\]: learning_rate must be greater than 0"),
])
def test_bad_recipes_are_refused_before_training(model_dir, data_dir, tmp_path, phases, message) -> None:
    path = write_recipe(tmp_path, model_dir, data_dir, tmp_path / "out", phases)
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)
    assert not (tmp_path / "out").exists()


def test_resume_needs_an_earlier_recipe(model_dir, data_dir, tmp_path, capsys) -> None:
    path = write_recipe(tmp_path, model_dir, data_dir, tmp_path / "out", TWO_PHASES)
    assert main(["train", str(path), "resume_from_checkpoint=true"]) == 1
    assert "holds no phase-N folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="resume_from_checkpoint: true"):
        load_recipe(path, ["resume_from_checkpoint=out/checkpoint-2"])
    with pytest.raises(ConfigError, match="only be set in the YAML"):
        load_recipe(path, ["phases=[]"])
