"""LoRA-drop: layer selection by LoRA output, tied LoRA for dropped layers, both phases in one train(), plain-LoRA
files that peftkit and PEFT load, bad input."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers import ATOL, changed, logits, make_cfg, read_log, snapshot, synthetic_examples, tiny_llama
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from peftkit import ConfigError, TunedModel
from peftkit.config import load_config
from peftkit.data import SFTCollator
from peftkit.methods.lora import Lora
from peftkit.methods.lora_drop import RECORD_NAME, LoraDrop, LoraDropConfig, select_layers
from peftkit.train import Trainer

LAYER_PARAMS = 256 + 192  # per layer, r=4: q_proj 32->32 (A 4x32 + B 32x4) + v_proj 32->16 (A 4x32 + B 16x4)


def tiny_llama4(seed: int = 0, initializer_range: float = 0.02) -> LlamaForCausalLM:
    """helpers' tiny Llama with 4 layers, so that several layers can be dropped and share one LoRA."""
    return tiny_llama(seed, initializer_range, num_hidden_layers=4)


def drop_config(**kw) -> LoraDropConfig:
    return LoraDropConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw})


def randomize(method: LoraDrop, seed: int = 0) -> None:
    """Perturb every trainable tensor once (shared ones once), so that B != 0 and comparisons test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def lora_tensors(method: LoraDrop, layer: int, module: str = "self_attn.q_proj") -> tuple[torch.Tensor, torch.Tensor]:
    state = method.state_dict()
    prefix = f"model.layers.{layer}.{module}"
    return state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"]


# --- selection ---
def test_select_layers_by_cumulative_share() -> None:
    importance = {0: 1.0, 1: 6.0, 2: 3.0}  # shares 0.1, 0.6, 0.3
    assert select_layers(importance, 0.6) == [1]
    assert select_layers(importance, 0.61) == [1, 2]
    assert select_layers(importance, 0.95) == [0, 1, 2]
    assert select_layers(importance, 1.0) == [0, 1, 2]
    assert select_layers({0: 0.0, 1: 0.0}, 0.5) == [0, 1]  # nothing to rank by: keep all


def test_importance_is_mean_squared_lora_output_and_picks_the_loud_layer() -> None:
    tuned = TunedModel(tiny_llama(), drop_config())
    method = tuned.method
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # layer 1's LoRA output ~100x layer 0's
        for layer, scale in ((0, 0.01), (1, 1.0)):
            for module in ("self_attn.q_proj", "self_attn.v_proj"):
                _, B = lora_tensors(method, layer, module)
                B.copy_(torch.randn(B.shape, generator=g) * scale)
    rows = synthetic_examples(3, seed=3)
    batch = SFTCollator(pad_token_id=0)(rows)  # padded: the mask must exclude the padding
    assert (batch["attention_mask"] == 0).any()

    # by hand: capture each LoRA module's input, sum ||s B A x||^2 over real tokens, divide by their count
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, p=path: inputs.__setitem__(p, a[0]))
             for path, layer in method.layers()]
    logits(tuned, batch["input_ids"])  # unmasked forward is fine: a causal model's real tokens ignore the padding
    for h in hooks:
        h.remove()
    real = batch["attention_mask"].bool()
    expected = {0: 0.0, 1: 0.0}
    for path, layer in method.layers():
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        out = inputs[path] @ A.T @ B.T * layer.scaling["default"]
        expected[int(path.split(".")[2])] += out.pow(2).sum(-1)[real].sum().item() / real.sum().item()

    importance = method.layer_importance([batch])
    assert importance.keys() == {0, 1}
    for i in (0, 1):
        assert importance[i] == pytest.approx(expected[i], rel=1e-4)
    assert importance[1] > 1000 * importance[0]
    assert select_layers(importance, 0.9) == [1]
    assert select_layers(importance, 1.0) == [0, 1]


# --- sharing ---
def test_trainable_count_after_drop_is_hand_computed() -> None:
    tuned = TunedModel(tiny_llama4(), drop_config())
    assert tuned.parameter_counts()[0] == 4 * LAYER_PARAMS  # 4 layers, each its own LoRA: 1792
    tuned.method.apply_selection([2])
    # layer 2 keeps its own q/v LoRA (448); layers 0, 1, 3 share one q and one v LoRA (448): 896
    expected = 2 * LAYER_PARAMS
    assert tuned.parameter_counts()[0] == expected
    assert sum(p.numel() for _, p in tuned.method.trainable_parameters()) == expected
    assert len(tuned.method.trainable_parameters()) == 2 * 2 * 2  # (own + shared) x (q, v) x (A, B)
    assert len(tuned.method.state_dict()) == 4 * 2 * 2  # saved per layer: every layer has its q/v A/B keys
    assert tuned.method.dropped_layers == [0, 1, 3] and tuned.method.shared_modules == ["self_attn.q_proj",
                                                                                        "self_attn.v_proj"]
    A0, B0 = lora_tensors(tuned.method, 0)
    for layer in (1, 3):
        A, B = lora_tensors(tuned.method, layer)
        assert A is A0 and B is B0
    assert lora_tensors(tuned.method, 2)[0] is not A0
    with pytest.raises(ConfigError, match=r"layer\(s\) \[7\]"):
        TunedModel(tiny_llama4(), drop_config()).method.apply_selection([7])


def test_saved_as_plain_lora_loads_in_peftkit_and_peft_and_merges(tmp_path, input_ids) -> None:
    tuned = TunedModel(tiny_llama4(), drop_config())
    tuned.method.apply_selection([1, 3])
    randomize(tuned.method)
    ours = logits(tuned, input_ids)
    assert (logits(tiny_llama4(), input_ids) - ours).abs().max() > 1e-3  # the adapter does change the output
    tuned.save(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not any(k.startswith("lora_drop_") for k in config)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert len(weights) == 16
    key = "base_model.model.model.layers.{}.self_attn.v_proj.lora_B.weight"
    assert torch.equal(weights[key.format(0)], weights[key.format(2)])  # the shared LoRA, written into each layer
    assert not torch.equal(weights[key.format(1)], weights[key.format(0)])

    back = TunedModel.load(tiny_llama4(), tmp_path)
    assert type(back.method) is Lora
    assert (logits(back, input_ids) - ours).abs().max() <= ATOL

    theirs = peft.PeftModel.from_pretrained(tiny_llama4(), tmp_path).eval()
    assert (logits(theirs, input_ids) - ours).abs().max() <= ATOL

    tuned.merge_adapter()
    assert (logits(tuned, input_ids) - ours).abs().max() <= ATOL
    merged = tuned.merge_and_unload()
    assert (logits(merged, input_ids) - ours).abs().max() <= ATOL


# --- both phases through the trainer ---
def test_trainer_runs_selection_then_trains_tied_lora(tmp_path, input_ids) -> None:
    # all-linear, r=4, per layer: q 256, k 192, v 192, o 256, gate 32->64 (128 + 256) 384, up 384,
    # down 64->32 (256 + 128) 384: 2048
    per_layer = 256 + 192 + 192 + 256 + 384 + 384 + 384
    # threshold 0.01: the single most important layer already holds that share, so exactly one layer is kept
    tuned = TunedModel(tiny_llama4(initializer_range=0.3),
                       drop_config(target_modules="all-linear", lora_drop_threshold=0.01, lora_drop_sample_ratio=0.25,
                                   lora_drop_steps=4))
    method = tuned.method
    initial = {k: t.detach().clone() for k, t in method.state_dict().items()}
    before = snapshot(tuned.model)
    cfg = make_cfg(tmp_path, max_steps=25, learning_rate=3e-2)
    trainer = Trainer(cfg, tuned, synthetic_examples(16), SFTCollator(pad_token_id=0, padding_free=True))

    # phase 1 done: one layer kept, three tied, importance measured, LoRA reset to its initial values for phase 2
    assert len(method.kept_layers) == 1 and len(method.dropped_layers) == 3
    (kept,) = method.kept_layers
    assert all(v > 0 for v in method.importance.values()) and set(method.importance) == {0, 1, 2, 3}
    assert kept == max(method.importance, key=method.importance.get)
    first_dropped = method.dropped_layers[0]
    for key, t in method.state_dict().items():
        layer = int(key.split(".")[2])
        source = key if layer == kept else key.replace(f"layers.{layer}.", f"layers.{first_dropped}.")
        assert torch.equal(t, initial[source]), key
    record = json.loads((tmp_path / "out" / RECORD_NAME).read_text())
    assert record["kept_layers"] == [kept] and record["sample_size"] == 4 and record["selection_steps"] == 4
    assert f"kept layers [{kept}]" in tuned.trainable_report()

    results = trainer.train()
    losses = [e["loss"] for e in read_log(cfg) if "loss" in e]
    assert losses[-1] < 0.5 * losses[0], losses
    assert results["trainable_params"] == 2 * per_layer  # the kept layer's own LoRA + one shared LoRA: 4096
    assert all("lora_" in name for name in changed(tuned.model, before))

    # the dropped layers' LoRA tensors are one trained tensor; the kept layer's differs
    shared_A, shared_B = lora_tensors(method, first_dropped, "mlp.down_proj")
    assert shared_B.abs().max() > 0
    for layer in method.dropped_layers[1:]:
        A, B = lora_tensors(method, layer, "mlp.down_proj")
        assert A is shared_A and torch.equal(B, shared_B)
    assert not torch.equal(lora_tensors(method, kept, "mlp.down_proj")[1], shared_B)

    # the trainer's saved output is plain LoRA with identical logits
    ours = logits(tuned.eval(), input_ids)
    back = TunedModel.load(tiny_llama4(initializer_range=0.3), cfg.output_dir)
    assert (logits(back, input_ids) - ours).abs().max() <= ATOL


def test_sample_is_at_least_one_batch_one_pass_and_threshold_one_keeps_all(tmp_path) -> None:
    tuned = TunedModel(tiny_llama(), drop_config(lora_drop_sample_ratio=0.01, lora_drop_threshold=1.0))
    Trainer(make_cfg(tmp_path, max_steps=1), tuned, synthetic_examples(16), SFTCollator(pad_token_id=0))
    record = json.loads((tmp_path / "out" / RECORD_NAME).read_text())
    # 1% of 16 rows rounds up to 1, raised to one batch of 2; one pass over 2 rows at batch size 2 is 1 step
    assert (record["sample_size"], record["selection_steps"]) == (2, 1)
    assert tuned.method.kept_layers == [0, 1] and tuned.method.dropped_layers == []
    assert sum(record["importance_share"].values()) == pytest.approx(1.0)


def test_resume_reuses_the_recorded_selection(tmp_path) -> None:
    cfg = make_cfg(tmp_path, max_steps=2, resume_from_checkpoint=True)
    (tmp_path / "out").mkdir()
    record = {"kept_layers": [0, 3], "importance": {"0": 5.0, "1": 1.0, "2": 1.0, "3": 4.0}}
    (tmp_path / "out" / RECORD_NAME).write_text(json.dumps(record))
    tuned = TunedModel(tiny_llama4(), drop_config())
    initial = {k: t.detach().clone() for k, t in tuned.method.state_dict().items()}
    Trainer(cfg, tuned, synthetic_examples(4), SFTCollator(pad_token_id=0))
    assert tuned.method.kept_layers == [0, 3] and tuned.method.dropped_layers == [1, 2]
    assert torch.equal(tuned.method.state_dict()["model.layers.0.self_attn.q_proj.lora_A"],
                       initial["model.layers.0.self_attn.q_proj.lora_A"])  # no selection training happened


# --- bad input ---
def cfg_with(**kw):
    return load_config(None, model_name_or_path="x", dataset="d", **kw)


def test_yaml_keys_build_the_config() -> None:
    method = cfg_with(finetuning_type="lora_drop", lora_rank=4, lora_drop_sample_ratio=0.5, lora_drop_threshold=0.8,
                      lora_drop_steps=3).method_config()
    assert isinstance(method, LoraDropConfig)
    assert (method.r, method.lora_alpha, method.lora_drop_sample_ratio, method.lora_drop_threshold,
            method.lora_drop_steps) == (4, 8, 0.5, 0.8, 3)


@pytest.mark.parametrize("key, value, message", [
    ("lora_drop_sample_ratio", 0, r"lora_drop_sample_ratio must be in \(0, 1\]"),
    ("lora_drop_sample_ratio", 1.5, r"lora_drop_sample_ratio must be in \(0, 1\]"),
    ("lora_drop_threshold", 0, r"lora_drop_threshold must be in \(0, 1\]"),
    ("lora_drop_threshold", 1.2, r"lora_drop_threshold must be in \(0, 1\]"),
    ("lora_drop_steps", 0, "lora_drop_steps must be an integer >= 1"),
    ("use_dora", True, "use_dora cannot be combined with finetuning_type lora_drop"),
])
def test_impossible_values_fail_before_training(key: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg_with(finetuning_type="lora_drop", **{key: value})


def test_lora_drop_key_with_plain_lora_warns() -> None:
    with pytest.warns(UserWarning, match="lora_drop_threshold is a setting of lora_drop, not of finetuning_type"):
        cfg_with(finetuning_type="lora", lora_drop_threshold=0.5)
