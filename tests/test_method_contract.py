"""The contract every registered method keeps (issue 17, item 6), one parametrised test per method: attach to the
tiny Llama, train 3 steps (the trainable tensors change, nothing else does), save, reload onto a fresh base with
identical logits, merged equal to unmerged where the method merges, PEFT loads the folder where PEFT knows the
method, and bad input (an unknown module, an adapter for another model size) is a PeftkitError."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import peft
import pytest
import torch
from helpers import VOCAB, changed, logits, make_cfg, rounding_tolerance, run, snapshot, synthetic_examples, tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peftkit import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    FreezeConfig,
    FullConfig,
    Ia3Config,
    LoraConfig,
    LoraDropConfig,
    MethodConfig,
    PeftkitError,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    SsfConfig,
    TunedModel,
    available_methods,
    get_method,
)

# Small settings that train on the tiny Llama in 3 steps (after test_dtypes' table); one per registered method.
SETTINGS: dict[str, tuple[Callable[[], MethodConfig], float]] = {
    "adalora": (lambda: AdaLoraConfig(init_r=4, target_r=2, target_modules="all-linear", lora_alpha=32, tinit=1,
                                      tfinal=1), 5e-2),
    "adapter": (lambda: AdapterConfig(adapter_size=4), 5e-2),
    "bitfit": (lambda: BitFitConfig(), 1e-1),
    "freeze": (lambda: FreezeConfig(freeze_trainable_layers=1), 3e-2),
    "full": (lambda: FullConfig(), 1e-2),
    "ia3": (lambda: Ia3Config(), 2e-1),
    "lora": (lambda: LoraConfig(r=4, target_modules="all-linear"), 1e-2),
    "lora_drop": (lambda: LoraDropConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_drop_sample_ratio=0.25,
                                         lora_drop_threshold=0.5), 3e-2),
    "p_tuning": (lambda: PTuningConfig(num_virtual_tokens=4), 1e-1),
    "p_tuning_v2": (lambda: PTuningV2Config(num_virtual_tokens=4), 1e-1),
    "prefix_tuning": (lambda: PrefixTuningConfig(num_virtual_tokens=4), 1e-1),
    "prompt_tuning": (lambda: PromptTuningConfig(num_virtual_tokens=4), 1e-1),
    "ssf": (lambda: SsfConfig(target_modules="all-linear"), 5e-2),
}
PEFT_KNOWS = {"LORA", "IA3", "ADALORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
STEPS = 3
PROMPT = {"p_tuning", "p_tuning_v2", "prefix_tuning", "prompt_tuning"}


def test_every_method_has_settings() -> None:
    assert set(SETTINGS) == set(available_methods())


def text_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The input tokens' logits only: PEFT's prompt tuning also returns its virtual tokens'."""
    return logits(model, ids)[:, -ids.shape[1]:]


def wider_llama() -> LlamaForCausalLM:
    """tiny_llama with hidden size 48: every adapter of the 32-wide model is the wrong shape for it."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_method_contract(name: str, tmp_path: Path, input_ids: torch.Tensor) -> None:
    make_config, lr = SETTINGS[name]
    method_cls = get_method(name)

    # attach, train 3 steps: every trainable tensor moves, nothing else does
    base = text_logits(tiny_llama(), input_ids)
    torch.manual_seed(0)
    tuned = TunedModel(tiny_llama(), make_config())
    trainable = {n for n, _ in tuned.trainable_parameters()}
    assert trainable
    before = snapshot(tuned.model)
    run(make_cfg(tmp_path, max_steps=STEPS, learning_rate=lr), synthetic_examples(8), tuned)
    moved = changed(tuned.model, before)
    assert moved == trainable, (sorted(moved - trainable), sorted(trainable - moved))

    # save; reload onto a fresh base: the same logits
    tuned.eval()
    trained = text_logits(tuned, input_ids)
    assert (trained - base).abs().max() > 1e-3  # the method is in the path, so the comparisons below test something
    out = tmp_path / "saved"
    tuned.save(out)
    if name == "full":  # a complete transformers model folder
        again = AutoModelForCausalLM.from_pretrained(out).eval()
    else:
        again = TunedModel.load(tiny_llama(), out)
    if name == "adalora":  # pruned triplets drop out of the reloaded sums: equal up to rounding
        assert (text_logits(again, input_ids) - trained).abs().max() <= rounding_tolerance(trained)
    else:
        assert torch.equal(text_logits(again, input_ids), trained)

    # PEFT loads what it knows, with the same logits
    peft_type = None if name == "full" else json.loads((out / "adapter_config.json").read_text())["peft_type"]
    if peft_type in PEFT_KNOWS:
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
        assert (text_logits(theirs, input_ids) - trained).abs().max() <= rounding_tolerance(trained)

    # bad input: the adapter saved for another model size (full: a model folder is no adapter)
    with pytest.raises(PeftkitError):
        TunedModel.load(wider_llama(), out)

    # merged equals unmerged where the method merges (in-place methods: merging is a no-op)
    if method_cls.mergeable:
        merged = text_logits(tuned.merge_and_unload(), input_ids)
        if method_cls.in_place:
            assert torch.equal(merged, trained)
        else:
            assert (merged - trained).abs().max() <= rounding_tolerance(trained)
    else:
        with pytest.raises(PeftkitError, match="cannot be merged"):
            tuned.merge_adapter()


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_unknown_target_module_is_an_error(name: str) -> None:
    """freeze names its modules in freeze_trainable_modules; full trains everything and rejects any module list."""
    key = "freeze_trainable_modules" if name == "freeze" else "target_modules"
    with pytest.raises(PeftkitError):
        TunedModel(tiny_llama(), dataclasses.replace(SETTINGS[name][0](), **{key: ["no_such_proj"]}))
