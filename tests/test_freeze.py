"""Freeze tuning (LLaMA-Factory's partial tuning): exactly the chosen layers and modules train, save/load, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import changed, logits, snapshot, tiny_gpt2, tiny_llama, train_losses
from safetensors.torch import load_file

from peftkit import AdapterLoadError, ConfigError, TunedModel
from peftkit.config import load_config
from peftkit.methods.freeze import FreezeConfig

COMMON = dict(model_name_or_path="x", dataset=["identity"])

# tiny_llama, per decoder layer: q_proj 32*32 = 1024, k_proj and v_proj 32*16 = 512 each, o_proj 1024 (self_attn 3072);
# gate/up/down_proj 32*64 = 2048 each (mlp 6144); input_layernorm and post_attention_layernorm 32 each: 9280 in all.
# Outside the layers: embed_tokens 128*32 = 4096, norm 32, lm_head 4096 (not tied).
CASES = {
    "last_layer_all": (dict(freeze_trainable_layers=1), ["model.layers.1."], 9280),
    "first_layer_mlp": (dict(freeze_trainable_layers=-1, freeze_trainable_modules="mlp"), ["model.layers.0.mlp."],
                        6144),
    "two_layers_attn_and_norm": (
        dict(freeze_trainable_layers=2, freeze_trainable_modules=["self_attn", "input_layernorm"]),
        [f"model.layers.{i}.{m}." for i in (0, 1) for m in ("self_attn", "input_layernorm")],
        2 * (3072 + 32),
    ),
    "nested_module_and_extras": (
        dict(freeze_trainable_layers=-2, freeze_trainable_modules="q_proj", freeze_extra_modules="embed_tokens,norm"),
        ["model.layers.0.self_attn.q_proj.", "model.layers.1.self_attn.q_proj.", "model.embed_tokens.", "model.norm."],
        2 * 1024 + 4096 + 32,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exactly_the_chosen_tensors_train(case: str, input_ids) -> None:
    kwargs, prefixes, count = CASES[case]
    tuned = TunedModel(tiny_llama(), FreezeConfig(**kwargs))
    expected = {n for n, _ in tuned.model.named_parameters() if any(n.startswith(p) for p in prefixes)}
    assert {n for n, _ in tuned.trainable_parameters()} == expected == set(tuned.method.state_dict())
    assert tuned.parameter_counts()[0] == count
    before = snapshot(tuned.model)
    tuned(input_ids=input_ids, labels=input_ids).loss.backward()
    torch.optim.SGD([p for _, p in tuned.method.trainable_parameters()], lr=1.0).step()
    assert changed(tuned.model, before) == expected


def test_training_lowers_loss(tmp_path) -> None:
    tuned = TunedModel(tiny_llama(initializer_range=0.2), FreezeConfig(freeze_trainable_layers=1))
    before = snapshot(tuned.model)
    losses = train_losses(tuned, tmp_path, steps=15, lr=3e-2)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert changed(tuned.model, before) == {n for n in before if n.startswith("model.layers.1.")}
    assert tuned.trainable_report().splitlines()[2] == (
        "Freeze: training 1 of 2 decoder layers (model.layers.1; modules: all)")


def test_save_load_and_merge(tmp_path, input_ids) -> None:
    cfg = FreezeConfig(freeze_trainable_layers=-1, freeze_trainable_modules="mlp", freeze_extra_modules=["lm_head"])
    tuned = TunedModel(tiny_llama(), cfg)
    with torch.no_grad():
        for t in tuned.method.state_dict().values():
            t.add_(torch.randn_like(t) * 0.2)
    expected = logits(tuned, input_ids)
    assert (expected - logits(tiny_llama(), input_ids)).abs().max() > 1e-3
    tuned.save(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PEFTKIT_FREEZE" and saved["freeze_trainable_modules"] == ["mlp"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{n}" for n in tuned.method.state_dict()}
    assert len(keys) == 3 + 1  # gate/up/down_proj of layer 0, lm_head

    again = TunedModel.load(tiny_llama(), tmp_path)
    assert torch.equal(logits(again, input_ids), expected)
    assert not any(p.requires_grad for p in again.model.parameters())
    assert torch.equal(logits(again.merge_and_unload(), input_ids), expected)  # in place: merged == unmerged
    with pytest.raises(AdapterLoadError, match="no tensor 'base_model.model.transformer.wte.weight'.*another base"):
        TunedModel.load(tiny_gpt2(), tmp_path)


def test_gpt2_tied_head(input_ids) -> None:
    cfg = FreezeConfig(freeze_trainable_layers=1, freeze_trainable_modules="attn", freeze_extra_modules="lm_head")
    tuned = TunedModel(tiny_gpt2(), cfg)
    model = tuned.model
    # GPT-2, layer 1's attn: c_attn 32*96 + 96 = 3168, c_proj 32*32 + 32 = 1056; lm_head is wte (128*32), counted once.
    assert tuned.parameter_counts()[0] == 3168 + 1056 + 4096
    assert set(tuned.method.state_dict()) == {"transformer.wte.weight", "transformer.h.1.attn.c_attn.weight",
                                              "transformer.h.1.attn.c_attn.bias", "transformer.h.1.attn.c_proj.weight",
                                              "transformer.h.1.attn.c_proj.bias"}
    tuned(input_ids=input_ids, labels=input_ids).loss.backward()
    torch.optim.SGD([p for _, p in tuned.method.trainable_parameters()], lr=1.0).step()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_half_precision_trains_float32_tensors(input_ids) -> None:
    """A bf16 model: the trained tensors go to fp32 and run behind casts; the frozen rest stays bf16 and unchanged."""
    base = tiny_gpt2().to(torch.bfloat16)
    reference = logits(tiny_gpt2().to(torch.bfloat16), input_ids).float()
    tuned = TunedModel(base, FreezeConfig(freeze_trainable_layers=-1, freeze_trainable_modules="mlp",
                                          freeze_extra_modules="lm_head"))
    trained = set(tuned.method.state_dict())
    assert {n for n, p in tuned.model.named_parameters() if p.dtype == torch.float32} == trained
    assert "float32 (the rest of the model stays torch.bfloat16)" in tuned.trainable_report()
    assert (logits(tuned, input_ids).float() - reference).abs().max() < 0.05  # the same function, up to bf16 rounding
    loss = tuned(input_ids=input_ids, labels=input_ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert {n for n, p in tuned.model.named_parameters() if p.grad is not None} == trained


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="freeze_trainable_layers must be a non-zero integer, got 0"):
        load_config(None, **COMMON, finetuning_type="freeze", freeze_trainable_layers=0)
    with pytest.raises(ConfigError, match="mixes 'all' with module names"):
        FreezeConfig(freeze_trainable_modules="all,mlp")
    with pytest.raises(ConfigError, match="does not apply to finetuning_type 'freeze'"):
        load_config(None, **COMMON, finetuning_type="freeze", additional_target=["lm_head"])
    for n in (3, -3):
        with pytest.raises(ConfigError, match=f"freeze_trainable_layers is {n}, but the model has 2 decoder layers"):
            TunedModel(tiny_llama(), FreezeConfig(freeze_trainable_layers=n))
    with pytest.raises(ConfigError, match="'attn' is not a module of the decoder layers. Choose from: input_layernorm, "
                                          "mlp, post_attention_layernorm, self_attn"):
        TunedModel(tiny_llama(), FreezeConfig(freeze_trainable_modules="mlp,attn"))
    with pytest.raises(ConfigError, match="'wte' is not a module outside the decoder layers. Choose from: "
                                          "embed_tokens, lm_head, norm"):
        TunedModel(tiny_llama(), FreezeConfig(freeze_extra_modules="wte"))


def test_yaml_keys() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(None, **COMMON, finetuning_type="freeze", freeze_trainable_layers=1,
                          freeze_trainable_modules="mlp,self_attn", freeze_extra_modules="embed_tokens").method_config()
    assert type(cfg) is FreezeConfig
    assert (cfg.freeze_trainable_layers, cfg.freeze_trainable_modules, cfg.freeze_extra_modules) == (
        1, ["mlp", "self_attn"], ["embed_tokens"])
    with pytest.warns(UserWarning, match="freeze_trainable_layers is a setting of freeze, not of finetuning_type 'lo"):
        load_config(None, **COMMON, freeze_trainable_layers=1)
