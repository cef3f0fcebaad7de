"""TrainingArguments keys that used to be accepted and ignored: save_strategy epoch, metric_for_best_model with
greater_is_better; the worker counts peftkit has no use for warn instead of being silently dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_cfg, read_log, run, synthetic_examples, tiny_llama

from peftkit import LoraConfig, TunedModel
from peftkit.config import load_config
from peftkit.errors import ConfigError
from peftkit.train.checkpoint import list_checkpoints


def lora() -> TunedModel:
    torch.manual_seed(0)
    return TunedModel(tiny_llama(initializer_range=0.3), LoraConfig(r=4, target_modules="all-linear"))


def test_save_strategy_epoch_checkpoints_at_each_epochs_end(tmp_path) -> None:
    cfg = make_cfg(tmp_path, num_train_epochs=3.0, save_strategy="epoch", save_steps=1)  # save_steps is not used
    run(cfg, synthetic_examples(8), lora())  # 8 rows, batch 2: 4 steps an epoch, 12 in all
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["checkpoint-4", "checkpoint-8"]


@pytest.mark.parametrize("greater", [None, True])
def test_metric_for_best_model_and_greater_is_better_choose_the_best_step(tmp_path, greater) -> None:
    cfg = make_cfg(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                   metric_for_best_model="eval_loss", greater_is_better=greater, learning_rate=5e-2)
    trainer, results = run(cfg, synthetic_examples(16), lora(), eval_data=synthetic_examples(4, seed=1))
    evals = {e["step"]: e["eval_loss"] for e in read_log(cfg) if "eval_loss" in e}
    pick = max if greater else min
    assert results["best_step"] == pick(evals, key=evals.get)
    assert len(set(evals.values())) > 1 and results["best_step"] in evals


def test_an_unknown_metric_is_refused(tmp_path) -> None:
    cfg = make_cfg(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, metric_for_best_model="eval_bleu")
    with pytest.raises(ConfigError, match="metric_for_best_model 'eval_bleu' is not among"):
        run(cfg, synthetic_examples(8), lora(), eval_data=synthetic_examples(4, seed=1))


def test_config_spells_metrics_and_warns_about_worker_counts() -> None:
    cfg = load_config(None, model_name_or_path="m", dataset="d", metric_for_best_model="loss")
    assert (cfg.metric_for_best_model, cfg.greater_is_better) == ("eval_loss", None)
    busy = load_config(None, model_name_or_path="m", dataset="d", preprocessing_num_workers=16,
                       dataloader_num_workers=4)
    assert busy.ignored_settings() == [
        "Ignoring preprocessing_num_workers=16: tokenization runs in this process, and its result is cached.",
        "Ignoring dataloader_num_workers=4: batches are built in the training process."]
    assert cfg.ignored_settings() == []


def test_a_run_warns_about_the_settings_it_ignores(tmp_path) -> None:
    from test_cli import save_word_tokenizer

    from peftkit.train import run_sft

    tiny_llama().save_pretrained(tmp_path / "model")
    save_word_tokenizer(tmp_path / "model")
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(None, model_name_or_path=str(tmp_path / "model"), dataset="identity", template="default",
                      dataset_dir=str(root / "examples" / "data"), max_steps=1, max_samples=4,
                      output_dir=str(tmp_path / "out"), dataloader_num_workers=4)
    with pytest.warns(UserWarning, match="Ignoring dataloader_num_workers=4"):
        run_sft(cfg)


def test_results_name_the_best_step(tmp_path) -> None:
    cfg = make_cfg(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2)
    run(cfg, synthetic_examples(8), lora(), eval_data=synthetic_examples(4, seed=1))
    results = json.loads((Path(cfg.output_dir) / "train_results.json").read_text())
    assert results["best_step"] in (2, 4)


def test_optim_fused_by_default_and_the_loop_trains_the_same_weights(tmp_path) -> None:
    weights = {}
    for optim in ["adamw_torch_fused", "adamw_torch"]:
        cfg = make_cfg(tmp_path / optim, max_steps=6, optim=optim, weight_decay=0.1)
        tuned = lora()
        trainer, _ = run(cfg, synthetic_examples(12), tuned)
        assert trainer.optimizer.defaults["fused"] is (True if optim == "adamw_torch_fused" else None)
        weights[optim] = {name: p.detach().clone() for name, p in tuned.method.trainable_parameters()}
    start = dict(lora().method.trainable_parameters())
    for name, fused in weights["adamw_torch_fused"].items():
        assert not torch.equal(fused, start[name]), name  # trained
        # rounding only: weights moved up to ~6e-2 in 6 steps at lr 1e-2; an element whose gradient is near zero
        # takes Adam's normalised step from its rounding (2.4e-6 seen once); a missing decay would be ~1e-4
        torch.testing.assert_close(fused, weights["adamw_torch"][name], rtol=1e-5, atol=1e-5)
    assert make_cfg(tmp_path).optim == "adamw_torch_fused"
