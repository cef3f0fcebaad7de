"""Objectives are the seam every training stage plugs into: the loop calls an objective and knows no stage or method
by name; a new objective, defined in this file alone, trains through `peftkit.train`; methods that train on their
own (LoRA-drop's selection phase) step through the Trainer's own step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import make_cfg, read_log, run, synthetic_examples, tiny_llama

import peftkit.train.trainer as trainer_module
from peftkit import LoraConfig, TunedModel, available_methods
from peftkit.config import load_config
from peftkit.data import IGNORE_INDEX
from peftkit.errors import ConfigError
from peftkit.methods.lora_drop import LoraDropConfig
from peftkit.objectives import Objective, available_objectives, register
from peftkit.train import run_sft

ROOT = Path(__file__).resolve().parents[1]


class FirstAnswerToken(Objective):
    """A toy stage: cross-entropy on each row's first label token only (one unit per row)."""

    name = "first_answer_token"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(((batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1)).sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        first = (targets != IGNORE_INDEX).int().argmax(dim=1)  # the first label position of each row
        rows = torch.arange(len(first))
        return torch.nn.functional.cross_entropy(logits[rows, first], targets[rows, first], reduction="sum")


@pytest.fixture(autouse=True)
def toy_stage(monkeypatch):
    """`stage: first_answer_token` while a test here runs, and gone after it (other tests list the stages)."""
    from peftkit.objectives import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register(FirstAnswerToken)


def test_a_new_objective_trains_through_the_loop_without_touching_the_package(tmp_path) -> None:
    assert "first_answer_token" in available_objectives()
    torch.manual_seed(0)
    tuned = TunedModel(tiny_llama(initializer_range=0.3), LoraConfig(r=4, target_modules="all-linear"))
    cfg = make_cfg(tmp_path, max_steps=30, stage="first_answer_token", per_device_train_batch_size=4)
    trainer, _ = run(cfg, synthetic_examples(16), tuned)
    assert isinstance(trainer.objective, FirstAnswerToken)
    losses = [e["loss"] for e in read_log(cfg) if "loss" in e]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # the first answer token (always 5) is learnt
    data = synthetic_examples(4)
    batch = trainer.collator(data)
    with torch.no_grad():
        assert trainer.objective.units(batch) == 4
        mean = trainer.objective.loss(tuned, batch).item() / 4
    assert mean < losses[0]


def test_the_stage_key_picks_the_objective_and_lists_the_valid_ones(tmp_path) -> None:
    from test_cli import save_word_tokenizer

    tiny_llama().save_pretrained(tmp_path / "model")
    save_word_tokenizer(tmp_path / "model")
    cfg = load_config(None, model_name_or_path=str(tmp_path / "model"), dataset="identity",
                      dataset_dir=str(ROOT / "examples" / "data"), template="default", max_steps=2, max_samples=8,
                      output_dir=str(tmp_path / "out"), stage="first_answer_token")
    results = run_sft(cfg)
    assert results["train_steps"] == 2
    with pytest.raises(ConfigError, match="stage 'spft' is unknown.*supported here: .*first_answer_token"):
        load_config(None, model_name_or_path="m", dataset="d", stage="spft")


def test_the_loop_names_no_stage_and_no_method() -> None:
    source = (ROOT / "src" / "peftkit" / "train" / "trainer.py").read_text()
    names = (set(available_methods()) | set(available_objectives()) | {"lora", "adalora", "lora-drop", "qlora"}) - {
        "adapter"}  # "adapter" is also the plain word for what every method adds
    found = {n for n in names if re.search(rf"\b{re.escape(n)}\b", source, re.IGNORECASE)}
    assert not found


def test_lora_drop_selection_steps_through_the_trainers_step(tmp_path, monkeypatch) -> None:
    calls = []
    real = trainer_module.optimizer_step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "optimizer_step", counting)
    torch.manual_seed(0)
    tuned = TunedModel(tiny_llama(), LoraDropConfig(r=4, target_modules=["q_proj", "v_proj"], lora_drop_steps=3))
    run(make_cfg(tmp_path, max_steps=2), synthetic_examples(16), tuned)
    assert len(calls) == 3 + 2  # the selection phase's steps, then the run's


def test_label_ignore_literal_lives_only_in_ignore_index() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "src" / "peftkit").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"(?<![\d.])-100\b", line)]
    assert hits == ["src/peftkit/data/templates.py:" + str(_ignore_index_line())]


def _ignore_index_line() -> int:
    lines = (ROOT / "src" / "peftkit" / "data" / "templates.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith("IGNORE_INDEX = -100"))
