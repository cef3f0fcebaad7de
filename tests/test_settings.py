"""Each YAML key is declared once: TrainConfig's own keys by its fields, a method's keys by its config class."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from peftkit.config import METHOD_SETTINGS, RUN_SETTINGS, STAGE_SETTINGS, TrainConfig, load_config
from peftkit.methods import available_methods, get_method
from peftkit.settings import GROUPS, Setting, merge_declarations


def test_every_method_key_comes_from_its_config_class() -> None:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for method in available_methods():
        cls = get_method(method).config_class
        own = {f.name for f in dataclasses.fields(cls)}
        for s in cls.yaml_keys:
            assert s.target in own, f"{method}: {s.name} fills {s.target}, which {cls.__name__} lacks"
            assert s.name in fields and fields[s.name].default == s.default and hints[s.name] == s.type
            assert method in METHOD_SETTINGS[s.name][1]
    # config.py declares no method key itself: each one is in some method's yaml_keys
    assert not {s.name for s in RUN_SETTINGS} & set(METHOD_SETTINGS)
    assert set(fields) == {s.name for s in RUN_SETTINGS} | set(METHOD_SETTINGS) | set(STAGE_SETTINGS)


def test_every_key_has_help_group_and_valid_default() -> None:
    every = [*RUN_SETTINGS, *(s for s, _ in METHOD_SETTINGS.values()), *(s for s, _ in STAGE_SETTINGS.values())]
    assert len(every) == len(dataclasses.fields(TrainConfig))
    for s in every:
        assert s.help.strip() and s.group in GROUPS, s.name
        assert not s.choices or s.default in s.choices, s.name
    TrainConfig(model_name_or_path="m")  # every default passes every check


def test_a_key_shared_by_methods_must_be_declared_alike() -> None:
    a = Setting("num_virtual_tokens", int, 20, "tokens")
    merged = merge_declarations([("p", a), ("q", Setting("num_virtual_tokens", int, 20, "other words"))])
    assert merged["num_virtual_tokens"][1] == ["p", "q"]
    with pytest.raises(TypeError, match="declared differently by p and q"):
        merge_declarations([("p", a), ("q", Setting("num_virtual_tokens", int, 10, "tokens"))])
    with pytest.raises(ValueError, match="group"):
        Setting("x", int, 1, "help", group="nowhere")


def test_choices_declared_on_a_run_key_are_checked() -> None:
    with pytest.raises(Exception, match="lr_scheduler_type 'cosin' is not one of.*Did you mean 'cosine'"):
        load_config(None, ["model_name_or_path=m", "lr_scheduler_type=cosin"])


def test_yaml_defaults_fill_the_method_config() -> None:
    lora = load_config(None, ["model_name_or_path=m"]).method_config()
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (8, 16, "all-linear")  # LLaMA-Factory's defaults
    cfg = load_config(None, ["model_name_or_path=m", "finetuning_type=adapter", "adapter_non_linearity=gelu"])
    assert cfg.method_config().non_linearity == "gelu"  # a key filling a differently named field
