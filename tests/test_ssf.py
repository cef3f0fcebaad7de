"""SSF: hand-counted parameters, training, save/load, merging into linears and norms, the RMSNorm refusal, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ATOL, TINY_MODELS, changed, logits, randomize, snapshot, tiny_gpt2, tiny_llama, train_losses
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftkit import ConfigError, PeftkitError, TunedModel
from peftkit.config import load_config
from peftkit.methods import AdapterLayer
from peftkit.methods.ssf import SsfConfig

# Each target costs 2 x its output features (γ and β). Tiny Llama: hidden 32, k/v out 16 (2 kv heads x 8), MLP 64,
# 2 layers; tiny GPT-2: n_embd 32, c_attn out 96, c_fc out 128, 2 layers.
LLAMA_LINEAR = 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)  # q, k, v, o, gate, up, down outputs = 256 -> 512 per layer
LLAMA_NORMS = 2 * (32 + 32)  # input_layernorm + post_attention_layernorm -> 128 per layer
COUNTS = {
    # 2 layers x (512 + 128) + the final norm 2 x 32 = 1344; lm_head is not a target
    "llama_default": ("llama", SsfConfig(), 2 * (LLAMA_LINEAR + LLAMA_NORMS) + 2 * 32, 2 * 9 + 1),
    # linears only: 2 x 512 = 1024
    "llama_all_linear": ("llama", SsfConfig(target_modules="all-linear"), 2 * LLAMA_LINEAR, 2 * 7),
    # layer 1 only (the final norm has no layer index): 512 + 128 = 640
    "llama_layer1": ("llama", SsfConfig(layers_to_transform=[1]), LLAMA_LINEAR + LLAMA_NORMS, 9),
    # per layer: c_attn 96 + attn.c_proj 32 + c_fc 128 + mlp.c_proj 32 = 288 -> 576, ln_1 + ln_2 2 x 64 = 128;
    # 2 x (576 + 128) + ln_f 64 = 1472
    "gpt2_default": ("gpt2", SsfConfig(), 2 * (2 * 288 + 2 * 2 * 32) + 2 * 32, 2 * 6 + 1),
    # named targets: q_proj out 32 and the attention norm 32, x2 (γ, β) x 2 layers = 256
    "llama_named": ("llama", SsfConfig(target_modules=["q_proj", "input_layernorm"]), 2 * 2 * (32 + 32), 4),
}


@pytest.mark.parametrize("variant", sorted(COUNTS))
def test_trainable_count_by_hand(variant: str) -> None:
    arch, config, expected, n_layers = COUNTS[variant]
    tuned = TunedModel(TINY_MODELS[arch](), config)
    assert tuned.parameter_counts()[0] == expected
    paths = [p for p, _ in tuned.method.layers()]
    assert len(paths) == n_layers and not any(p.endswith(("lm_head", "embed_tokens", "wte")) for p in paths)


def test_default_targets_recorded_and_noted() -> None:
    tuned = TunedModel(tiny_llama(), SsfConfig())
    assert tuned.method.config.target_modules == ["down_proj", "gate_proj", "input_layernorm", "k_proj", "norm",
                                                  "o_proj", "post_attention_layernorm", "q_proj", "up_proj", "v_proj"]
    notes = tuned.trainable_report().splitlines()[-3:]
    assert notes[0] == "SSF: 14 linear and 5 norm layers scaled and shifted."
    assert notes[1].startswith("SSF: merging gives 14 bias-free linear layers a bias")
    assert "LlamaRMSNorm has no bias" in notes[2] and "all-linear" in notes[2]


def test_training_lowers_loss_and_changes_only_ssf(tmp_path, input_ids) -> None:
    base = logits(tiny_llama(initializer_range=0.5), input_ids)
    tuned = TunedModel(tiny_llama(initializer_range=0.5), SsfConfig())
    assert torch.equal(logits(tuned, input_ids), base)  # γ = 1, β = 0: training starts from the base model
    before = snapshot(tuned.model)
    losses = train_losses(tuned, tmp_path, steps=15, lr=5e-2, per_device_train_batch_size=8)
    assert losses[-1] < 0.5 * losses[0], losses
    names = {n for n, _ in tuned.trainable_parameters()}
    assert len(names) == 2 * 19 and all(".ssf_scale." in n or ".ssf_shift." in n for n in names)
    assert changed(tuned.model, before) == names  # every SSF tensor moved, nothing else did


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_identical(arch: str, tmp_path, input_ids) -> None:
    make = TINY_MODELS[arch]
    tuned = TunedModel(make(), SsfConfig())
    randomize(tuned.method, 0.3)
    ours = logits(tuned, input_ids)
    tuned.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTKIT_SSF" and config["target_modules"] == tuned.method.config.target_modules
    stack = "transformer.h" if arch == "gpt2" else "model.layers"
    norm = "ln_1" if arch == "gpt2" else "input_layernorm"
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert len(keys) == 2 * (13 if arch == "gpt2" else 19)
    assert f"base_model.model.{stack}.1.{norm}.ssf_shift" in keys
    again = TunedModel.load(make(), tmp_path)
    assert torch.equal(logits(again, input_ids), ours)
    assert (logits(make(), input_ids) - ours).abs().max() > 1e-3


def test_merge_gpt2_linears_and_layernorms(tmp_path, input_ids) -> None:
    base_weights = {n: p.clone() for n, p in tiny_gpt2().named_parameters()}
    tuned = TunedModel(tiny_gpt2(), SsfConfig())  # Conv1D with biases, LayerNorm with biases, ln_f too
    randomize(tuned.method, 0.3)
    unmerged = logits(tuned, input_ids)

    tuned.merge_adapter()
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL
    tuned.unmerge_adapter()
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL
    restored = {n.replace(".base_layer", ""): p for n, p in tuned.model.named_parameters() if ".ssf_" not in n}
    assert restored.keys() == base_weights.keys()
    assert max((restored[n] - w).abs().max().item() for n, w in base_weights.items()) <= 1e-6

    merged = tuned.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert (logits(merged, input_ids) - unmerged).abs().max() <= ATOL
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded, input_ids) - unmerged).abs().max() <= ATOL


def test_merge_llama_creates_biases_and_scales_rmsnorm(tmp_path, input_ids) -> None:
    """Bias-free linears get a bias on merge; RMSNorm takes γ (its β stays 0 here: see the refusal test)."""
    tuned = TunedModel(tiny_llama(), SsfConfig())
    randomize(tuned.method, 0.3, keys=lambda key: "norm" not in key or "ssf_scale" in key)
    unmerged = logits(tuned, input_ids)
    q_proj = tuned.model.get_submodule("model.layers.0.self_attn.q_proj").base_layer
    assert q_proj.bias is None

    tuned.merge_adapter()
    assert q_proj.bias is not None
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL
    tuned.unmerge_adapter()
    assert q_proj.bias is None  # the created bias is removed again
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL

    merged = tuned.merge_and_unload()
    assert (logits(merged, input_ids) - unmerged).abs().max() <= ATOL
    merged.save_pretrained(tmp_path)
    # Llama reloads the new biases when its config allows them
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attention_bias=True, mlp_bias=True).eval()
    assert (logits(reloaded, input_ids) - unmerged).abs().max() <= ATOL


def test_merge_refuses_rmsnorm_shift(input_ids) -> None:
    tuned = TunedModel(tiny_llama(), SsfConfig(target_modules=["input_layernorm", "v_proj"]))
    randomize(tuned.method, 0.3)
    unmerged = logits(tuned, input_ids)
    with pytest.raises(PeftkitError, match="LlamaRMSNorm: the norm has no bias .*target_modules: all-linear"):
        tuned.merge_and_unload()
    assert any(isinstance(m, AdapterLayer) for m in tuned.model.modules())  # nothing was unloaded
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL  # and the output is unchanged
    tuned.unmerge_adapter()
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL


def test_two_adapters_and_disable(input_ids) -> None:
    base = logits(tiny_llama(), input_ids)
    tuned = TunedModel(tiny_llama(), SsfConfig(target_modules="all-linear"), adapter_name="a")
    randomize(tuned.method, 0.3, seed=1)
    tuned.add_adapter("b", SsfConfig(target_modules=["q_proj", "norm"]))
    a = logits(tuned, input_ids)
    tuned.set_adapter("b")
    randomize(tuned.method, 0.3, seed=2)
    b = logits(tuned, input_ids)
    assert (a - b).abs().max() > 1e-3 and (a - base).abs().max() > 1e-3
    assert all(".b" in n for n, _ in tuned.trainable_parameters())
    with tuned.disable_adapter():
        assert torch.equal(logits(tuned, input_ids), base)
    tuned.set_adapter("a")
    assert torch.equal(logits(tuned, input_ids), a)


# --- bad input ---
def test_bad_config_values() -> None:
    with pytest.raises(ConfigError, match="target_modules is empty"):
        SsfConfig(target_modules=[])
    with pytest.raises(ConfigError, match="layer indices >= 0"):
        SsfConfig(layers_to_transform=[-1])
    with pytest.raises(ConfigError, match="matched no module.*input_layernorm"):  # embeddings are not SSF targets
        TunedModel(tiny_llama(), SsfConfig(target_modules=["embed_tokens"]))


def test_yaml_and_warnings() -> None:
    cfg = load_config(None, model_name_or_path="x", dataset="d", finetuning_type="ssf", target_modules="q_proj,norm")
    assert cfg.method_config() == SsfConfig(target_modules=["q_proj", "norm"])
    with pytest.warns(UserWarning, match="feedforward_modules is a setting of ia3, not of finetuning_type 'ssf'"):
        load_config(None, model_name_or_path="x", dataset="d", finetuning_type="ssf", feedforward_modules="down_proj")
