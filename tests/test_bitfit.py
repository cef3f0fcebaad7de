"""BitFit: bias terms only (new zero biases where a layer has none), save/load, merge, adapter switching, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import changed, logits, randomize, snapshot, tiny_gpt2, tiny_llama, tiny_qwen2, train_losses
from transformers import AutoModelForCausalLM

from peftkit import ConfigError, TunedModel
from peftkit.config import load_config
from peftkit.methods import AdapterLayer
from peftkit.methods.bitfit import BitFitConfig

COMMON = dict(model_name_or_path="x", dataset=["identity"])
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}
# One bias element per output feature of each target. tiny_llama / tiny_qwen2 per layer: q_proj 32 + k_proj 16 +
# v_proj 16 + o_proj 32 + gate_proj 64 + up_proj 64 + down_proj 32 = 256 (their RMSNorms have no bias), two layers: 512.
# tiny_gpt2 per layer: ln_1 32 + c_attn 96 + attn.c_proj 32 + ln_2 32 + c_fc 128 + mlp.c_proj 32 = 352; 2 layers + ln_f.
COUNTS = {"llama": 2 * 256, "qwen2": 2 * 256, "gpt2": 2 * 352 + 32}
NEW_BIASES = {  # layers that had no bias and got one: Llama all 7 linears, Qwen2 o_proj and the MLP, GPT-2 none
    "llama": "14 of them had no bias and got a new one (down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)",
    "qwen2": "8 of them had no bias and got a new one (down_proj, gate_proj, o_proj, up_proj)",
    "gpt2": "0 of them had no bias and got a new one",
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_counts_notes_and_only_biases_change(arch: str, input_ids) -> None:
    tuned = TunedModel(MODELS[arch](), BitFitConfig())
    names = {n for n, _ in tuned.trainable_parameters()}
    assert tuned.parameter_counts()[0] == COUNTS[arch]
    assert names and all(".bitfit_bias." in n for n in names)
    assert NEW_BIASES[arch] in tuned.trainable_report()
    lost = "loses the new biases of down_proj, gate_proj, o_proj, up_proj"
    assert (lost in tuned.trainable_report()) == (arch == "qwen2")
    before = snapshot(tuned.model)
    tuned(input_ids=input_ids, labels=input_ids).loss.backward()
    torch.optim.SGD([p for _, p in tuned.method.trainable_parameters()], lr=1.0).step()
    assert changed(tuned.model, before) == names  # the base biases (GPT-2's, Qwen2's q/k/v) stay as they were


def test_training_lowers_loss(tmp_path) -> None:
    tuned = TunedModel(tiny_llama(initializer_range=0.2), BitFitConfig())
    before = snapshot(tuned.model)
    losses = train_losses(tuned, tmp_path, steps=40, lr=1e-1, lr_scheduler_type="constant")  # biases learn slowly
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert changed(tuned.model, before) == {n for n, _ in tuned.trainable_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_merge(arch: str, tmp_path, input_ids) -> None:
    make = MODELS[arch]
    tuned = TunedModel(make(), BitFitConfig())
    randomize(tuned.method, 0.5)
    expected = logits(tuned, input_ids)
    base = logits(make(), input_ids)
    assert (expected - base).abs().max() > 1e-2
    tuned.save(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PEFTKIT_BITFIT"
    again = TunedModel.load(make(), tmp_path / "adapter")
    assert torch.equal(logits(again, input_ids), expected)

    tuned.merge_adapter()
    assert (logits(tuned, input_ids) - expected).abs().max() <= 1e-5
    tuned.unmerge_adapter()
    assert torch.equal(logits(tuned, input_ids), expected)
    if arch == "llama":  # unmerging removes the biases merging created, and the config flag that announced them
        assert tuned.model.model.layers[0].self_attn.q_proj.base_layer.bias is None
        assert tuned.model.config.attention_bias is False and tuned.model.config.mlp_bias is False
    with tuned.disable_adapter():
        assert torch.equal(logits(tuned, input_ids), base)

    merged = tuned.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert (logits(merged, input_ids) - expected).abs().max() <= 1e-5
    merged.save_pretrained(tmp_path / "merged")  # Llama: attention_bias / mlp_bias are set, so the biases reload
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(reloaded, input_ids) - expected).abs().max() <= 1e-5


def test_two_adapters_switch(input_ids) -> None:
    base = logits(tiny_llama(), input_ids)
    tuned = TunedModel(tiny_llama(), BitFitConfig(), adapter_name="all")
    randomize(tuned.method, 0.5, seed=1)
    tuned.add_adapter("q", BitFitConfig(target_modules=["q_proj"]))
    tuned.set_adapter("q")
    randomize(tuned.method, 0.5, seed=2)
    assert {n for n, _ in tuned.trainable_parameters()} == {f"model.layers.{i}.self_attn.q_proj.bitfit_bias.q"
                                                            for i in (0, 1)}
    q = logits(tuned, input_ids)
    tuned.set_adapter("all")
    everything = logits(tuned, input_ids)
    assert (q - everything).abs().max() > 1e-2 and (q - base).abs().max() > 1e-3
    with tuned.disable_adapter():
        assert torch.equal(logits(tuned, input_ids), base)


def test_target_modules_narrow() -> None:
    # q_proj 32 + v_proj 16 per layer, two layers
    assert TunedModel(tiny_llama(), BitFitConfig(target_modules=["q_proj", "v_proj"])).parameter_counts()[0] == 2 * 48
    # GPT-2's first LayerNorm only: 32 per layer
    assert TunedModel(tiny_gpt2(), BitFitConfig(target_modules=["ln_1"])).parameter_counts()[0] == 2 * 32
    # layers_to_transform applies to the default targets too: layer 1 of tiny_gpt2, no ln_f
    assert TunedModel(tiny_gpt2(), BitFitConfig(layers_to_transform=[1])).parameter_counts()[0] == 352


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="'model.layers.0.input_layernorm' is a LlamaRMSNorm without a bias"):
        TunedModel(tiny_llama(), BitFitConfig(target_modules=["input_layernorm"]))
    with pytest.raises(ConfigError, match="matched no module.*candidate modules are: .*q_proj"):
        TunedModel(tiny_llama(), BitFitConfig(target_modules=["c_attn"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(None, **COMMON, finetuning_type="bitfit", target_modules="q_proj,v_proj").method_config()
    assert type(cfg) is BitFitConfig and cfg.target_modules == ["q_proj", "v_proj"]
    with pytest.warns(UserWarning, match="freeze_extra_modules is a setting of freeze, not of finetuning_type 'bitf"):
        load_config(None, **COMMON, finetuning_type="bitfit", freeze_extra_modules="norm")
