"""Bottleneck adapters (Houlsby / Pfeiffer): placement, exact start, training, save/load, switching, merge refusal,
bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import TINY_MODELS, changed, logits, randomize, snapshot, tiny_llama, train_losses
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, TunedModel
from peftkit.cli import main
from peftkit.config import load_config
from peftkit.errors import PeftkitError
from peftkit.methods.adapter import AdapterConfig, BottleneckLayer


@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_starts_exactly_as_base(arch: str, adapter_type: str, input_ids) -> None:
    make = TINY_MODELS[arch]
    base = logits(make(), input_ids)
    tuned = TunedModel(make(), AdapterConfig(adapter_type=adapter_type, non_linearity="gelu"))
    assert torch.equal(logits(tuned, input_ids), base)
    randomize(tuned.method, 0.3)
    assert (logits(tuned, input_ids) - base).abs().max() > 1e-3  # the adapters are in the path


def test_generate_with_wrapped_attention(input_ids) -> None:
    tuned = TunedModel(tiny_llama(), AdapterConfig())
    out = tuned.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, tiny_llama().generate(input_ids[:1], max_new_tokens=4, do_sample=False))


# Hand counts. tiny_llama and tiny_gpt2 both have hidden size d = 32 and 2 layers. An adapter of width m has
# down W [m, d] + b [m] and up W [d, m] + b [d]: 2*d*m + m + d parameters.
#   default m = round(32 / 16) = 2: 2*32*2 + 2 + 32 = 162;   adapter_size=4: 2*32*4 + 4 + 32 = 292
#   houlsby: 2 adapters (attention, MLP) x 2 layers = 4;      pfeiffer: 1 adapter (MLP) x 2 layers = 2
COUNTS = [
    ("llama", "houlsby", None, 4 * 162, ["model.layers.{i}.self_attn", "model.layers.{i}.mlp"]),
    ("llama", "pfeiffer", None, 2 * 162, ["model.layers.{i}.mlp"]),
    ("gpt2", "houlsby", 4, 4 * 292, ["transformer.h.{i}.attn", "transformer.h.{i}.mlp"]),
    ("gpt2", "pfeiffer", 4, 2 * 292, ["transformer.h.{i}.mlp"]),
]


@pytest.mark.parametrize("arch,adapter_type,size,expected,paths", COUNTS)
def test_trainable_count_by_hand(arch: str, adapter_type: str, size: int | None, expected: int, paths) -> None:
    tuned = TunedModel(TINY_MODELS[arch](), AdapterConfig(adapter_type=adapter_type, adapter_size=size))
    assert tuned.parameter_counts()[0] == expected
    assert sum(p.numel() for _, p in tuned.method.trainable_parameters()) == expected
    assert [p for p, _ in tuned.method.layers()] == [p.format(i=i) for i in range(2) for p in paths]
    assert tuned.trainable_report().splitlines()[-1].startswith(f"{adapter_type} bottleneck adapters:")


def test_training_lowers_loss_and_changes_only_adapters(tmp_path) -> None:
    tuned = TunedModel(tiny_llama(initializer_range=0.2), AdapterConfig(adapter_type="houlsby", adapter_size=8))
    before = snapshot(tuned.model)
    losses = train_losses(tuned, tmp_path, steps=20, lr=5e-2)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses  # the mean of the last steps: single batches are noisy
    adapter_names = {n for n, _ in tuned.trainable_parameters()}
    assert changed(tuned.model, before) == adapter_names  # every adapter tensor moved, nothing else did
    assert all(".adapter_down." in n or ".adapter_up." in n for n in adapter_names)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_identical(arch: str, tmp_path, input_ids) -> None:
    make = TINY_MODELS[arch]
    tuned = TunedModel(make(), AdapterConfig(adapter_type="houlsby", adapter_size=3, non_linearity="tanh",
                                             layers_to_transform=[1]))
    randomize(tuned.method, 0.3)
    expected = logits(tuned, input_ids)
    tuned.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTKIT_ADAPTER" and config["non_linearity"] == "tanh"
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    block = "model.layers.1" if arch == "llama" else "transformer.h.1"
    assert len(keys) == 8 and f"base_model.model.{block}.mlp.adapter_up.weight" in keys
    again = TunedModel.load(make(), tmp_path)
    assert torch.equal(logits(again, input_ids), expected)
    assert again.parameter_counts()[0] == 0  # loaded for inference: frozen


@pytest.mark.parametrize("arch,explicit", [("llama", ["o_proj", "down_proj"]), ("gpt2", ["attn.c_proj", "mlp.c_proj"])])
def test_adapter_sits_before_the_residual_add(arch: str, explicit: list[str], input_ids) -> None:
    """An adapter on the attention block (a tuple output) equals one on its output projection, which the block
    returns unchanged (GPT-2: after a dropout, off in eval), so it is applied before the residual add."""
    make = TINY_MODELS[arch]
    blocks = TunedModel(make(), AdapterConfig(adapter_size=4))
    randomize(blocks.method, 0.3)
    projections = TunedModel(make(), AdapterConfig(adapter_size=4, target_modules=explicit))
    ours = list(blocks.method.state_dict().values())
    theirs = list(projections.method.state_dict().values())
    assert len(ours) == len(theirs) == 16
    with torch.no_grad():
        for src, dst in zip(ours, theirs):
            dst.copy_(src)
    assert (logits(blocks, input_ids) - logits(projections, input_ids)).abs().max() <= 1e-5


def test_several_adapters_switch_disable_delete(input_ids) -> None:
    base = logits(tiny_llama(), input_ids)
    tuned = TunedModel(tiny_llama(), AdapterConfig(adapter_type="houlsby"), adapter_name="h")
    randomize(tuned.method, 0.3, seed=1)
    tuned.add_adapter("p", AdapterConfig(adapter_type="pfeiffer", adapter_size=5, non_linearity="silu"))
    assert tuned.active_adapter == "h"
    h = logits(tuned, input_ids)
    tuned.set_adapter("p")
    randomize(tuned.method, 0.3, seed=2)
    p = logits(tuned, input_ids)
    assert (h - p).abs().max() > 1e-3 and (p - base).abs().max() > 1e-3
    assert {n.split(".")[-2] for n, _ in tuned.trainable_parameters()} == {"p"}  # only the active adapter trains
    with tuned.disable_adapter():
        assert torch.equal(logits(tuned, input_ids), base)
    tuned.set_adapter("h")
    assert torch.equal(logits(tuned, input_ids), h)
    tuned.delete_adapter("h")
    assert tuned.active_adapter == "p" and torch.equal(logits(tuned, input_ids), p)
    assert all(layer.adapter_names() in ([], ["p"])
               for layer in tuned.model.modules() if isinstance(layer, BottleneckLayer))
    tuned.delete_adapter("p")
    assert torch.equal(logits(tuned, input_ids), base)


# --- not mergeable ---
def test_merge_refused_with_a_clear_message() -> None:
    tuned = TunedModel(tiny_llama(), AdapterConfig())
    with pytest.raises(PeftkitError) as e:
        tuned.merge_and_unload()
    message = str(e.value)
    assert message.startswith("finetuning_type 'adapter' cannot be merged into the base weights")
    mergeable = message.rsplit("train a mergeable finetuning_type: ", 1)[1].rstrip(".").split(", ")
    assert "lora" in mergeable and "adapter" not in mergeable and "\n" not in message
    assert any(isinstance(m, BottleneckLayer) for m in tuned.model.modules())  # nothing was unloaded


def test_export_refuses_in_one_line(tmp_path, capsys) -> None:
    TunedModel(tiny_llama(), AdapterConfig()).save(tmp_path / "adapter")
    export_dir = tmp_path / "merged"
    # the base model folder does not even exist: the refusal comes before any loading
    args = [f"model_name_or_path={tmp_path / 'no_base'}", f"adapter_name_or_path={tmp_path / 'adapter'}",
            f"export_dir={export_dir}"]
    assert main(["export", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: finetuning_type 'adapter' cannot be merged") and len(err.splitlines()) == 1
    assert "Traceback" not in err and not export_dir.exists()


# --- bad input ---
def test_invalid_values() -> None:
    with pytest.raises(ConfigError, match="adapter_size must be an integer >= 1"):
        AdapterConfig(adapter_size=0)
    with pytest.raises(ConfigError, match="reduction_factor must be a number greater than 0"):
        AdapterConfig(reduction_factor=0)
    with pytest.raises(ConfigError, match="adapter_type must be one of: houlsby, pfeiffer; .*Did you mean 'houlsby'"):
        AdapterConfig(adapter_type="houlsbi")
    with pytest.raises(ConfigError, match="adapter_non_linearity must be one of: relu, gelu, silu, tanh"):
        AdapterConfig(non_linearity="swish")
    with pytest.raises(ConfigError, match="'all-linear' does not apply"):
        AdapterConfig(target_modules="all-linear")


def test_yaml_keys_validated_before_training() -> None:
    common = dict(model_name_or_path="x", dataset=["identity"], finetuning_type="adapter")
    cfg = load_config(None, **common, adapter_type="pfeiffer", adapter_size=4, adapter_non_linearity="gelu")
    assert cfg.method_config() == AdapterConfig(adapter_type="pfeiffer", adapter_size=4, non_linearity="gelu")
    with pytest.raises(ConfigError, match="adapter_size must be"):
        load_config(None, **common, adapter_size=0)
    with pytest.raises(ConfigError, match="reduction_factor must be"):
        load_config(None, **common, reduction_factor=-2)
    with pytest.raises(ConfigError, match="adapter_non_linearity must be one of"):
        load_config(None, **common, adapter_non_linearity="swish")
    with pytest.warns(UserWarning, match="adapter_size is a setting of adapter, not of finetuning_type 'lora'"):
        load_config(None, model_name_or_path="x", dataset=["identity"], adapter_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the adapter's own keys do not warn
        load_config(None, **common, adapter_size=4)


class Toy(nn.Module):
    """No decoder layers that the adapter knows."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_unknown_architecture_names_what_it_looked_for() -> None:
    with pytest.raises(ConfigError, match=r"self_attn / attn / self_attention.*mlp.*Set target_modules") as e:
        TunedModel(Toy(), AdapterConfig())
    assert "body" in str(e.value)
    with pytest.raises(ConfigError, match="matched no module"):
        TunedModel(Toy(), AdapterConfig(target_modules=["attention"]))
    # named explicitly, any module with a tensor output works; on a Linear the width follows its output (8)
    toy = Toy()
    x = torch.randn(3, 8)
    expected = toy(x)
    tuned = TunedModel(toy, AdapterConfig(target_modules=["body.0"], adapter_size=2))
    assert tuned.parameter_counts()[0] == 2 * 8 * 2 + 2 + 8  # 2*d*m + m + d with d = 8, m = 2
    assert torch.equal(tuned(x), expected)
