"""LoRA+ (loraplus_lr_ratio): optimizer groups and learning rates as the trainer builds them, training, PEFT interop,
bad input."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
from helpers import logits, make_cfg, synthetic_examples, tiny_llama, train_losses

from peftkit import ConfigError, LoraConfig, TunedModel
from peftkit.config import load_config
from peftkit.data import SFTCollator
from peftkit.methods import available_methods
from peftkit.train import Trainer


def test_trainer_optimizer_groups_and_learning_rates(tmp_path) -> None:
    config = LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], modules_to_save=["norm"], use_dora=True,
                        loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5)
    tuned = TunedModel(tiny_llama(), config)
    cfg = make_cfg(tmp_path, learning_rate=1e-3, weight_decay=0.1, max_steps=4, lr_scheduler_type="linear")
    trainer = Trainer(cfg, tuned, synthetic_examples(4), SFTCollator(pad_token_id=0))

    def names(group: dict) -> set[str]:
        by_id = {id(p): n for n, p in tuned.model.named_parameters()}
        return {by_id[id(p)] for p in group["params"]}

    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert list(groups) == ["lora_A", "no_decay", "lora_B", "lora_embedding_B"]  # lora_A first: the logged lr
    q = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert names(groups["lora_B"]) == {f"{m}.lora_B.default" for m in q}
    assert names(groups["lora_embedding_B"]) == {"model.embed_tokens.lora_B.default"}
    assert names(groups["no_decay"]) == {"model.norm.copies.default.weight"}  # RMSNorm weight of modules_to_save
    # A of every layer (embedding too) and the DoRA magnitudes learn at the base rate
    assert names(groups["lora_A"]) == ({f"{m}.lora_{k}.default" for m in q for k in ("A", "magnitude")}
                                       | {"model.embed_tokens.lora_A.default",
                                          "model.embed_tokens.lora_magnitude.default"})
    assert sum(len(g["params"]) for g in groups.values()) == len(tuned.trainable_parameters())

    expected = {"lora_A": (1e-3, 0.1), "no_decay": (1e-3, 0.0), "lora_B": (1.6e-2, 0.1),
                "lora_embedding_B": (1e-5, 0.1)}
    for name, (lr, decay) in expected.items():
        assert groups[name]["lr"] == pytest.approx(lr, rel=1e-12) and groups[name]["weight_decay"] == decay
    trainer.optimizer.step()  # no gradients yet: a no-op, so the scheduler may step
    trainer.scheduler.step()  # linear decay over 4 steps: every group at 3/4 of its own rate
    for name, (lr, _) in expected.items():
        assert groups[name]["lr"] == pytest.approx(0.75 * lr, rel=1e-12)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.75e-3, rel=1e-12)
    assert "LoRA+: lora_B learns at 16 x learning_rate" in tuned.trainable_report()


def test_without_ratio_one_group(tmp_path) -> None:
    tuned = TunedModel(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    trainer = Trainer(make_cfg(tmp_path, max_steps=2), tuned, synthetic_examples(4), SFTCollator(pad_token_id=0))
    assert len(trainer.optimizer.param_groups) == 1
    assert len(trainer.optimizer.param_groups[0]["params"]) == 6  # A and B of 2 q_proj and of the embedding


def test_training_lowers_loss_and_saves_as_plain_lora(tmp_path, input_ids) -> None:
    tuned = TunedModel(tiny_llama(initializer_range=0.2),
                       LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", loraplus_lr_ratio=16))
    losses = train_losses(tuned, tmp_path, steps=20, lr=2e-3)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    out = tmp_path / "out"  # the trainer saved the adapter at the end
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not any("loraplus" in k for k in config)
    tuned.eval()
    ours = logits(tuned, input_ids)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(initializer_range=0.2), out).eval()
    assert (logits(theirs, input_ids) - ours).abs().max() <= 1e-5
    assert (logits(TunedModel.load(tiny_llama(initializer_range=0.2), out), input_ids) - ours).abs().max() <= 1e-5


# --- bad input ---
COMMON = dict(model_name_or_path="x", dataset=["identity"])


def test_yaml_keys_reach_the_config_and_bad_values_fail_early() -> None:
    method = load_config(None, **COMMON, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5).method_config()
    assert (method.loraplus_lr_ratio, method.loraplus_lr_embedding) == (16.0, 1e-5)
    for ratio in (0, -4):
        with pytest.raises(ConfigError, match=f"loraplus_lr_ratio must be greater than 0.*got {float(ratio)!r}"):
            load_config(None, **COMMON, loraplus_lr_ratio=ratio)
    with pytest.raises(ConfigError, match="loraplus_lr_embedding must be greater than 0"):
        load_config(None, **COMMON, loraplus_lr_ratio=16, loraplus_lr_embedding=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LoRA's own key: no warning
        load_config(None, **COMMON, loraplus_lr_ratio=16)


def test_ratio_with_another_method_warns() -> None:
    other = "ia3" if "ia3" in available_methods() else "adapter"
    with pytest.warns(UserWarning, match=f"loraplus_lr_ratio is a setting of .*lora.*not of finetuning_type '{other}'"):
        load_config(None, **COMMON, finetuning_type=other, loraplus_lr_ratio=16)
