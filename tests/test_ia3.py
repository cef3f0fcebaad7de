"""IA3: PEFT interop both ways (Llama, GPT-2), merging, training, hand-counted parameters, bad input."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers import ATOL, TINY_MODELS, changed, logits, randomize, snapshot, tiny_gpt2, tiny_llama, train_losses
from transformers import AutoModelForCausalLM

from peftkit import AdapterLoadError, ConfigError, TunedModel
from peftkit.config import load_config
from peftkit.methods import AdapterLayer
from peftkit.methods.ia3 import Ia3Config, Ia3Layer

# The tiny models: Llama/Qwen2 hidden 32, 4 heads of 8, 2 kv heads (k/v out 2 x 8 = 16), MLP 64, 2 layers;
# GPT-2 n_embd 32 (c_attn out 3 x 32 = 96, MLP 4 x 32 = 128), 2 layers. Output scaling costs out_features,
# feed-forward (input) scaling in_features.
COUNTS = [
    # per layer: k_proj out 16 + v_proj out 16 + down_proj in 64 = 96; 2 layers
    ("llama", 2 * (16 + 16 + 64), {"self_attn.k_proj": (16, 1), "self_attn.v_proj": (16, 1), "mlp.down_proj": (1, 64)}),
    # per layer: q_proj out 32 + v_proj out 16 + down_proj in 64 = 112 (PEFT's Qwen2 default scales q, not k)
    ("qwen2", 2 * (32 + 16 + 64), {"self_attn.q_proj": (32, 1), "self_attn.v_proj": (16, 1), "mlp.down_proj": (1, 64)}),
    # per layer: attn.c_attn out 96 + mlp.c_proj in 128 = 224; attn.c_proj is not a target
    ("gpt2", 2 * (96 + 128), {"attn.c_attn": (96, 1), "mlp.c_proj": (1, 128)}),
]


@pytest.mark.parametrize("arch,expected,shapes", COUNTS)
def test_default_targets_and_trainable_count_by_hand(arch: str, expected: int, shapes: dict) -> None:
    tuned = TunedModel(TINY_MODELS[arch](), Ia3Config())
    assert tuned.parameter_counts()[0] == expected
    stack = "transformer.h" if arch == "gpt2" else "model.layers"
    got = {k: tuple(t.shape) for k, t in tuned.method.state_dict().items()}
    assert got == {f"{stack}.{i}.{m}.ia3_scale": s for i in range(2) for m, s in shapes.items()}
    oracle = peft.get_peft_model(TINY_MODELS[arch](), peft.IA3Config(task_type="CAUSAL_LM"))
    assert oracle.get_nb_trainable_parameters()[0] == expected  # PEFT's defaults give the same vectors
    outputs = 2 * (len(shapes) - 1)  # every target but the feed-forward one, in 2 layers
    note = f"IA3: {outputs} layers scale their output, 2 (feed-forward) their input."
    assert tuned.trainable_report().splitlines()[-1] == note


def test_training_lowers_loss_and_changes_only_ia3_vectors(tmp_path) -> None:
    tuned = TunedModel(tiny_llama(initializer_range=0.5), Ia3Config(target_modules="all-linear"))
    assert tuned.method.config.feedforward_modules == ["down_proj"]  # the architecture default, kept for all-linear
    before = snapshot(tuned.model)
    losses = train_losses(tuned, tmp_path, steps=15, lr=2e-1, per_device_train_batch_size=8)
    assert losses[-1] < 0.5 * losses[0], losses
    names = {n for n, _ in tuned.trainable_parameters()}
    assert len(names) == 2 * 7 and all(".ia3_scale." in n for n in names)
    assert changed(tuned.model, before) == names  # every vector moved, nothing else did


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_identical(arch: str, tmp_path, input_ids) -> None:
    make = TINY_MODELS[arch]
    tuned = TunedModel(make(), Ia3Config())
    randomize(tuned.method, 0.5)
    ours = logits(tuned, input_ids)
    tuned.save(tmp_path)
    again = TunedModel.load(make(), tmp_path)
    assert again.method.config.feedforward_modules == tuned.method.config.feedforward_modules
    assert torch.equal(logits(again, input_ids), ours)
    assert (logits(make(), input_ids) - ours).abs().max() > 1e-3  # the adapter does change the output


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftkit_adapter_loads_in_peft(arch: str, tmp_path, input_ids) -> None:
    make = TINY_MODELS[arch]
    tuned = TunedModel(make(), Ia3Config())
    randomize(tuned.method, 0.5)
    ours = logits(tuned, input_ids)
    tuned.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] == (arch == "gpt2")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert (logits(make(), input_ids) - ours).abs().max() > 1e-3
    assert (logits(theirs, input_ids) - ours).abs().max() <= ATOL


PEFT_VARIANTS = {
    "llama_default": ("llama", {}),
    "llama_regex": ("llama", dict(target_modules=r".*\.(q_proj|up_proj|down_proj)",
                                  feedforward_modules=r".*down_proj")),
    "llama_exclude": ("llama", dict(target_modules=["o_proj", "down_proj"], feedforward_modules=["down_proj"],
                                    exclude_modules=["layers.0.mlp.down_proj"])),
    # a plain string is a regex to PEFT: "o_proj" fully matches no path, so o_proj (32 -> 32) scales its output there
    "llama_plain_string": ("llama", dict(target_modules=["k_proj", "o_proj"], feedforward_modules="o_proj")),
    "gpt2_default": ("gpt2", {}),
}


@pytest.mark.parametrize("variant", sorted(PEFT_VARIANTS))
def test_peft_adapter_loads_in_peftkit(variant: str, tmp_path, input_ids) -> None:
    arch, kwargs = PEFT_VARIANTS[variant]
    make = TINY_MODELS[arch]
    theirs = peft.get_peft_model(make(), peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False, **kwargs)).eval()
    expected = logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    ours = TunedModel.load(make(), tmp_path)
    assert len(ours.method.state_dict()) == sum(1 for n, _ in theirs.named_parameters() if ".ia3_l." in n)
    assert (logits(ours, input_ids) - expected).abs().max() <= ATOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_unload(arch: str, tmp_path, input_ids) -> None:
    make = TINY_MODELS[arch]
    base_weights = {n: p.clone() for n, p in make().named_parameters()}
    # all-linear: GPT-2's c_attn and attn.c_proj have biases, which an output scale multiplies too
    feedforward = ["mlp.c_proj"] if arch == "gpt2" else ["down_proj"]
    tuned = TunedModel(make(), Ia3Config(target_modules="all-linear", feedforward_modules=feedforward))
    randomize(tuned.method, 0.5)
    unmerged = logits(tuned, input_ids)

    tuned.merge_adapter()
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL
    tuned.unmerge_adapter()
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL
    restored = {n.replace(".base_layer", ""): p for n, p in tuned.model.named_parameters() if "ia3_scale" not in n}
    assert max((restored[n] - w).abs().max().item() for n, w in base_weights.items()) <= 1e-6

    merged = tuned.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert (logits(merged, input_ids) - unmerged).abs().max() <= ATOL
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded, input_ids) - unmerged).abs().max() <= ATOL


def test_zero_entry_still_unmerges_exactly() -> None:
    tuned = TunedModel(tiny_gpt2(), Ia3Config(target_modules=["c_attn"], feedforward_modules=[]))
    layer = tuned.model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, Ia3Layer)
    weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    with torch.no_grad():
        layer.ia3_scale["default"][3] = 0.0  # a division could not undo this
    tuned.merge_adapter()
    assert torch.all(layer.base_layer.weight[:, 3] == 0) and layer.base_layer.bias[3] == 0
    tuned.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer.base_layer.bias, bias)


# --- bad input ---
def test_feedforward_must_be_a_target() -> None:
    with pytest.raises(ConfigError, match="feedforward_modules must be a subset of target_modules.*down_proj"):
        Ia3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match="subset"):  # from YAML, before any model is loaded
        load_config(None, model_name_or_path="x", dataset="d", finetuning_type="ia3", target_modules="k_proj,v_proj",
                    feedforward_modules="down_proj")
    with pytest.raises(ConfigError, match="subset"):  # defaults resolved on the model: up_proj is no default target
        TunedModel(tiny_llama(), Ia3Config(feedforward_modules=["up_proj"]))
    with pytest.raises(ConfigError, match="layers_to_transform"):
        Ia3Config(layers_to_transform=[0])
    with pytest.raises(ConfigError, match="matched no module.*k_proj"):
        TunedModel(tiny_llama(), Ia3Config(target_modules=["query"], feedforward_modules=[]))


def test_yaml_keys_and_warnings() -> None:
    cfg = load_config(None, model_name_or_path="x", dataset="d", finetuning_type="ia3",
                      target_modules="k_proj,down_proj", feedforward_modules="down_proj")
    method = cfg.method_config()
    assert (method.target_modules, method.feedforward_modules) == (["k_proj", "down_proj"], ["down_proj"])
    with pytest.warns(UserWarning, match="lora_rank is a setting of .*lora.*not of finetuning_type 'ia3'"):
        load_config(None, model_name_or_path="x", dataset="d", finetuning_type="ia3", lora_rank=4)
    with pytest.warns(UserWarning, match="feedforward_modules is a setting of ia3"):
        load_config(None, model_name_or_path="x", dataset="d", finetuning_type="lora", feedforward_modules="down_proj")


def test_peft_config_with_unknown_setting_is_refused(tmp_path) -> None:
    TunedModel(tiny_llama(), Ia3Config()).save(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "ia3_dropout": 0.1}))
    with pytest.raises(AdapterLoadError, match="'ia3_dropout'.*does not support"):
        TunedModel.load(tiny_llama(), tmp_path)
