"""Learning is real, on the real model (smollm2-135m, LoRA) and LLaMA-Factory's demo data, held-out sets measured
before and after training: DPO raises held-out reward accuracy and margin, a reward model ranks held-out pairs
better than chance, continued pretraining lowers held-out perplexity."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import SHARED_DATA

from peftkit.config import TrainConfig
from peftkit.data import build_dataset, collator_for
from peftkit.models import load_model_and_tokenizer
from peftkit.objectives import get_objective
from peftkit.precision import base_dtype
from peftkit.train import Trainer
from peftkit.tuned import TunedModel
from peftkit.varlen import supports_padding_free

pytestmark = pytest.mark.slow


def before_and_after(model_name: str, tmp_path, **kw) -> tuple[dict, dict]:
    """Held-out metrics of a fresh adapter, then after training: run.py's steps, with an evaluation before."""
    settings = dict(model_name_or_path=model_name, dataset_dir=SHARED_DATA, output_dir=str(tmp_path / "out"),
                    val_size=20, cutoff_len=384, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                    max_steps=30, logging_steps=5, lora_rank=8, lora_target="all", seed=0, warmup_ratio=0.1)
    settings.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TrainConfig(**settings)
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=base_dtype(None, False, "cpu"))
    objective = get_objective(cfg.stage, cfg)
    train, evals = build_dataset(tokenizer, cfg.dataset, cfg.dataset_dir, kind=objective.data, stage=cfg.stage,
                                 cutoff_len=cfg.cutoff_len, val_size=cfg.val_size, packing=cfg.packing, seed=cfg.seed,
                                 max_samples=cfg.max_samples, cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(cfg.seed)  # the adapter's initial values, as run.py seeds them
    tuned = TunedModel(model, cfg.method_config())
    collator = collator_for(objective.data, tokenizer.pad_token_id, mask_dtype=model.dtype,
                            padding_free=supports_padding_free(model))
    trainer = Trainer(cfg, tuned, train, collator, evals, tokenizer=tokenizer, objective=objective)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"\n{cfg.stage} {kw}: before {before}\nafter {after}")
    return before, after


def test_dpo_raises_held_out_reward_accuracy_and_margin(smollm2, tmp_path) -> None:
    before, after = before_and_after(smollm2, tmp_path, stage="dpo", dataset="dpo_en_demo", learning_rate=5e-4,
                                     pref_beta=0.1, cutoff_len=128)
    assert before["eval_rewards/accuracies"] == 0.0 and before["eval_rewards/margins"] == 0.0  # policy = reference
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"]
    assert after["eval_rewards/margins"] > 0.0
    assert after["eval_loss"] < before["eval_loss"]


def test_reward_model_ranks_held_out_pairs(smollm2, tmp_path) -> None:
    before, after = before_and_after(smollm2, tmp_path, stage="rm", dataset="dpo_en_demo", learning_rate=1e-3,
                                     max_steps=60, cutoff_len=256)
    assert before["eval_loss"] == pytest.approx(0.6931472, abs=1e-6)  # the head starts at zero: no pair preferred
    assert after["eval_rewards/accuracies"] > 0.5


def test_pretraining_lowers_held_out_perplexity(smollm2, tmp_path) -> None:
    before, after = before_and_after(smollm2, tmp_path, stage="pt", dataset="c4_demo", learning_rate=1e-3,
                                     max_steps=10, max_samples=200, cutoff_len=256)
    assert after["eval_perplexity"] < before["eval_perplexity"]
