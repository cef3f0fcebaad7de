"""The training loop: loss goes down, accumulation is exact, resume is exact, hooks run, artifacts are written."""

from __future__ import annotations

import json

import helpers
import pytest
import torch
from helpers import make_cfg, read_log, synthetic_examples, tiny_llama

from peftkit import LoraConfig, TunedModel
from peftkit.data import SFTCollator
from peftkit.train import Trainer
from peftkit.train.checkpoint import list_checkpoints


def tuned_llama(dropout: float = 0.0) -> TunedModel:
    torch.manual_seed(0)
    return TunedModel(tiny_llama(initializer_range=0.3),
                      LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))


def run(cfg, data, eval_data=None, tuned=None) -> tuple[Trainer, dict]:
    return helpers.run(cfg, data, tuned or tuned_llama(), eval_data)


def test_loss_goes_down_and_artifacts(tmp_path) -> None:
    cfg = make_cfg(tmp_path, num_train_epochs=4.0, plot_loss=True, eval_strategy="steps", eval_steps=8,
                   lr_scheduler_type="cosine", warmup_ratio=0.1)
    trainer, results = run(cfg, synthetic_examples(32), eval_data=synthetic_examples(8, seed=1))
    log = read_log(cfg)
    losses = [e["loss"] for e in log if "loss" in e]
    evals = [e["eval_loss"] for e in log if "eval_loss" in e]
    assert len(losses) == trainer.total_steps == 64
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8
    assert evals[-1] < evals[0]
    assert all({"step", "epoch", "loss", "learning_rate"} <= set(e) for e in log if "loss" in e)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").stat().st_size > 1000
    saved = json.loads((out / "train_results.json").read_text())
    assert saved["train_steps"] == 64 and saved["trainable_params"] == results["trainable_params"] > 0
    assert saved["peak_memory_mb"] > 0 and saved["train_tokens_per_second"] > 0
    # tokens/s measures training: the evaluations' time is reported apart and left out
    assert 0 < saved["eval_runtime"] < saved["train_runtime"]
    train_only = saved["train_runtime"] - saved["eval_runtime"]
    assert saved["train_tokens_per_second"] == pytest.approx(trainer.state.tokens_seen / train_only, rel=1e-2)


def test_accumulation_equals_big_batch(tmp_path) -> None:
    """bs=1 x 4 accumulated equals bs=4 in one go: the loss is normalised by the real token count of the step."""
    data = synthetic_examples(8)
    big, _ = run(make_cfg(tmp_path / "a", per_device_train_batch_size=4, max_steps=2, seed=3), data)
    acc, _ = run(make_cfg(tmp_path / "b", per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=2,
                          seed=3), data)
    la = [e["loss"] for e in read_log(big.cfg)]
    lb = [e["loss"] for e in read_log(acc.cfg)]
    assert la == pytest.approx(lb, abs=1e-5)
    for (k, a), b in zip(big.method.state_dict().items(), acc.method.state_dict().values()):
        # relative to the tensor: Adam turns the last-bit differences of near-zero gradients (one GEMM of 4 rows vs
        # four of 1) into visible ones, element by element
        assert (a - b).norm() <= 1e-5 * a.norm(), k


class Interrupt(Exception):
    pass


def test_resume_is_exact(tmp_path) -> None:
    """Kill after step 5 (checkpoint at 4), resume: every later loss equals the uninterrupted run's."""
    data = synthetic_examples(20)
    common = dict(max_steps=9, save_steps=2, save_total_limit=2, gradient_accumulation_steps=2,
                  per_device_train_batch_size=2, lr_scheduler_type="cosine", warmup_steps=2)
    ref_cfg = make_cfg(tmp_path / "ref", **common)
    run(ref_cfg, data, tuned=tuned_llama(dropout=0.1))  # dropout: the RNG state must be restored too
    reference = {e["step"]: e["loss"] for e in read_log(ref_cfg)}

    cfg = make_cfg(tmp_path / "killed", **common)
    trainer = Trainer(cfg, tuned_llama(dropout=0.1), data, SFTCollator(pad_token_id=0))

    def die(step: int) -> None:
        if step == 5:
            raise Interrupt

    trainer.method.on_step_end = die
    with pytest.raises(Interrupt):
        trainer.train()
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["checkpoint-2", "checkpoint-4"]

    resumed_cfg = make_cfg(tmp_path / "killed", resume_from_checkpoint=True, **common)
    run(resumed_cfg, data, tuned=tuned_llama(dropout=0.1))
    resumed = {e["step"]: e["loss"] for e in read_log(resumed_cfg)}
    assert sorted(resumed) == list(range(1, 10))
    for step in range(5, 10):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["checkpoint-6", "checkpoint-8"]


def test_hooks_are_called(tmp_path) -> None:
    tuned = tuned_llama()
    calls = {"prepare": 0, "steps": [], "groups": 0}
    method = tuned.method
    original_groups = method.param_groups

    def param_groups(lr):
        calls["groups"] += 1
        return original_groups(lr)

    def on_step_end(step: int) -> None:  # AdaLoRA's allocation reads the step's gradients: they must still be there
        assert all(p.grad is not None for _, p in method.trainable_parameters())
        calls["steps"].append(step)

    def loss_term() -> torch.Tensor:
        calls["terms"] += 1
        return sum(p.sum() for _, p in method.trainable_parameters()) * 0.0

    calls["terms"] = 0
    method.prepare = lambda trainer: calls.__setitem__("prepare", calls["prepare"] + 1)
    method.on_step_end = on_step_end
    method.param_groups = param_groups
    method.loss_term = loss_term
    run(make_cfg(tmp_path, max_steps=3, gradient_accumulation_steps=2), synthetic_examples(12), tuned=tuned)
    assert calls == {"prepare": 1, "steps": [1, 2, 3], "groups": 1, "terms": 6}  # one term per micro-batch


def contradicting(rows: list[dict]) -> list[dict]:
    """The rows with another answer (9 10 11 12 instead of 5 6 7 8): the better the training answer is learnt, the
    higher their loss, so the best adapter on them is an early one, on any CPU (a diverging learning rate was not:
    it diverges late with AVX-512 and not at all without)."""
    out = []
    for row in rows:
        n = row["labels"].count(-100)
        answer = [9, 10, 11, 12, *row["input_ids"][n + 4:]]
        out.append({"input_ids": row["input_ids"][:n] + answer, "labels": [-100] * n + answer})
    return out


def test_load_best_model_at_end(tmp_path) -> None:
    """When the eval loss rises during training, the best (lowest eval loss) adapter is the one kept."""
    cfg = make_cfg(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                   lr_scheduler_type="constant", learning_rate=0.03)
    eval_data = contradicting(synthetic_examples(8, seed=1))
    trainer, results = run(cfg, synthetic_examples(16), eval_data=eval_data)
    evals = {e["step"]: e["eval_loss"] for e in read_log(cfg) if "eval_loss" in e}
    best_step = min(evals, key=evals.get)
    assert best_step < 12 and evals[12] > evals[best_step] + 0.1  # the final adapter is not the best one
    assert results["best_step"] == best_step and results["best_eval_loss"] == pytest.approx(evals[best_step], abs=1e-6)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[best_step], abs=1e-5)


def test_token_loss_matches_transformers_loss() -> None:
    """Trimming logits to label positions changes nothing: same mean loss as transformers' own, padding included."""
    from peftkit.train import token_loss_sum

    tuned = tuned_llama()
    batch = SFTCollator(pad_token_id=0)(synthetic_examples(4))
    with torch.no_grad():
        total, n = token_loss_sum(tuned, batch)
        reference = tuned(**batch).loss
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert (total / n).item() == pytest.approx(reference.item(), abs=1e-6)


@pytest.mark.parametrize("padding_free", [False, True])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, padding_free: bool) -> None:
    """Also padding-free: the recomputation in the backward pass must run the same (per-example) attention."""
    data = synthetic_examples(8)
    plain, _ = helpers.run(make_cfg(tmp_path / "a", max_steps=3), data, tuned_llama(), padding_free=padding_free)
    ckpt, _ = helpers.run(make_cfg(tmp_path / "b", max_steps=3, gradient_checkpointing=True), data, tuned_llama(),
                          padding_free=padding_free)
    assert [e["loss"] for e in read_log(plain.cfg)] == pytest.approx([e["loss"] for e in read_log(ckpt.cfg)], abs=1e-5)


def test_save_only_model_checkpoints_hold_the_adapter_and_refuse_to_resume(tmp_path) -> None:
    from peftkit import ConfigError

    cfg = make_cfg(tmp_path, max_steps=4, save_steps=2, save_only_model=True)
    run(cfg, synthetic_examples(8))
    ckpt = list_checkpoints(cfg.output_dir)[-1]
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "optimizer.pt").exists()
    with pytest.raises(ConfigError, match="save_only_model"):
        run(make_cfg(tmp_path, max_steps=6, resume_from_checkpoint=str(ckpt)), synthetic_examples(8))


def test_load_best_model_at_end_survives_a_resume(tmp_path) -> None:
    """The best adapter so far travels in each checkpoint: a run killed after its best step and resumed still ends
    with the best adapter, as an uninterrupted run does."""
    common = dict(max_steps=12, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, save_steps=4,
                  lr_scheduler_type="constant", learning_rate=0.03)  # best early, before the kill at step 9
    eval_data, data = contradicting(synthetic_examples(8, seed=1)), synthetic_examples(16)
    ref, ref_results = run(make_cfg(tmp_path / "ref", **common), data, eval_data=eval_data)

    cfg = make_cfg(tmp_path / "killed", **common)
    trainer = Trainer(cfg, tuned_llama(), data, SFTCollator(pad_token_id=0), eval_data)

    def die(step: int) -> None:
        if step == 9:
            raise Interrupt

    trainer.method.on_step_end = die
    with pytest.raises(Interrupt):
        trainer.train()
    resumed, results = run(make_cfg(tmp_path / "killed", resume_from_checkpoint=True, **common), data,
                           eval_data=eval_data)
    assert results["best_step"] == ref_results["best_step"] < 9
    assert resumed.evaluate()["eval_loss"] == pytest.approx(ref.evaluate()["eval_loss"], abs=1e-6)
    assert resumed.evaluate()["eval_loss"] == pytest.approx(ref_results["best_eval_loss"], abs=1e-5)
