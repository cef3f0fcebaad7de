"""`torch_compile: true`: compiled decoder layers train as the eager ones do (fp32: equal losses and weights), compile
once for all steps' shapes, and leave the model as it was outside the training steps."""

from __future__ import annotations

import pytest
import torch
from helpers import make_cfg, read_log, run, synthetic_examples, tiny_llama
from torch import nn

from peftkit import LoraConfig, TunedModel
from peftkit.errors import ConfigError
from peftkit.train.compile import CACHE_ENV, decoder_layers


def lora(dtype: torch.dtype = torch.float32) -> TunedModel:
    return TunedModel(tiny_llama(initializer_range=0.3).to(dtype), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def train(tmp_path, name: str, compile_: bool, padding_free: bool, steps: int = 5,
          dtype: torch.dtype = torch.float32) -> tuple[list[float], TunedModel]:
    tuned = lora(dtype)
    cfg = make_cfg(tmp_path / name, max_steps=steps, torch_compile=compile_, per_device_train_batch_size=3)
    run(cfg, synthetic_examples(15), tuned, padding_free=padding_free)
    return [e["loss"] for e in read_log(cfg) if "loss" in e], tuned


@pytest.fixture
def dynamo(tmp_path, monkeypatch):
    """Inductor's cache in tmp_path, and dynamo's counters from zero."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.slow  # inductor compiles the layers: ~1 min a test on 2 cores
@pytest.mark.parametrize("padding_free", [True, False])
def test_compiled_layers_train_as_the_eager_ones_in_fp32(tmp_path, dynamo, padding_free) -> None:
    eager, eager_model = train(tmp_path, "eager", False, padding_free)
    assert dynamo["stats"]["unique_graphs"] == 0
    compiled, compiled_model = train(tmp_path, "compiled", True, padding_free)
    # the layers ran through torch.compile, and each layer variant (the first layer's input needs no gradient, the
    # second's does) compiled once for all five steps' token counts, a graph on each side of the attention: 4-7
    # graphs here, where compiling for each step's shapes would make >= 20
    assert 0 < dynamo["stats"]["unique_graphs"] <= 8
    assert len(compiled) == len(eager) == 5
    assert compiled == pytest.approx(eager, rel=1e-5)
    trained = dict(eager_model.method.trainable_parameters())
    for name, p in compiled_model.method.trainable_parameters():
        torch.testing.assert_close(p, trained[name], rtol=1e-5, atol=1e-6)
    for layer in decoder_layers(compiled_model.model):  # outside training steps the layers run their own forward
        assert "forward" not in layer.__dict__


@pytest.mark.slow
def test_compiled_layers_train_a_bf16_base_as_the_eager_ones_up_to_rounding(tmp_path, dynamo) -> None:
    """A bf16 base takes the bf16 paths (LoRA's bf16 product, the matmul attention outside the graphs); inductor rounds
    its fused norms and SwiGLU once where torch's operators (and peftkit's kernels) round each step."""
    eager, eager_model = train(tmp_path, "eager", False, True, dtype=torch.bfloat16)
    compiled, compiled_model = train(tmp_path, "compiled", True, True, dtype=torch.bfloat16)
    assert 0 < dynamo["stats"]["unique_graphs"] <= 8
    assert next(compiled_model.model.parameters()).dtype == torch.bfloat16
    assert len(compiled) == len(eager) == 5
    assert compiled == pytest.approx(eager, rel=1e-2)  # 4e-3 at most here


def test_a_model_without_known_decoder_layers_is_refused_before_training(tmp_path) -> None:
    class Plain(nn.Module):
        pass

    with pytest.raises(ConfigError, match="torch_compile: found no decoder layers"):
        decoder_layers(Plain())


def test_gradient_checkpointing_is_named_as_leaving_the_layers_uncompiled(tmp_path) -> None:
    """torch's checkpoint disables dynamo inside it, so the compiled forward would silently run eagerly."""
    with pytest.warns(UserWarning, match="torch_compile has no effect with gradient_checkpointing"):
        make_cfg(tmp_path, torch_compile=True, gradient_checkpointing=True)
