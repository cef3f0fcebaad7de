"""The only place that knows Hugging Face PEFT's file layout: `adapter_config.json` + `adapter_model.safetensors`.

Methods name their tensors in their own words; this module renames them to PEFT's keys on save and back on load,
so adapters move freely between peftkit, PEFT, vLLM and llama.cpp.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AdapterLoadError
from .atomic import atomic_write
from ..methods.base import Method, MethodConfig
from ..methods.lora import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# The PEFT release whose format we write; PEFT reads adapters of older and newer releases alike.
PEFT_VERSION = "0.21.2"

# Our internal tensor suffix -> PEFT's, per peft_type. Keys not listed (biases) keep their names.
_SUFFIXES: dict[str, list[tuple[str, str]]] = {
    "LORA": [
        (".lora_A", ".lora_A.weight"),
        (".lora_B", ".lora_B.weight"),
        (".lora_emb_A", ".lora_embedding_A"),
        (".lora_emb_B", ".lora_embedding_B"),
        (".lora_magnitude", ".lora_magnitude_vector"),
    ],
}
_PEFT_TYPE = {"lora": "LORA"}  # our method name -> PEFT's peft_type, for the methods PEFT also has
# Methods PEFT lacks are saved with peft_type "PEFTKIT_<NAME>" (PEFT refuses to load them rather than mistaking them
# for its own) and their config's fields as they are.
OWN_PREFIX = "PEFTKIT_"
_NOT_CONFIG = ("peft_type", "base_model_name_or_path", "peft_version", "peftkit_version", "inference_mode", "revision")


def peft_type_of(config: MethodConfig) -> str:
    if isinstance(config, LoraConfig):  # LoRA variants (LoRA+, LoRA-drop) save as plain LoRA
        return "LORA"
    return _PEFT_TYPE.get(config.method) or OWN_PREFIX + config.method.upper()

# PEFT config keys that change the math and that peftkit does not implement yet: loading must not silently ignore them.
_UNSUPPORTED_LORA = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "layer_replication": None,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
}


def peft_key(internal: str, peft_type: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    key = internal.replace(".saved.", ".")  # a modules_to_save copy is saved under the module's own name
    for ours, theirs in _SUFFIXES.get(peft_type, []):
        if key.endswith(ours):
            key = key[: -len(ours)] + theirs
            break
    return PREFIX + key


def _legacy_keys(key: str) -> list[str]:
    """Older PEFT releases wrote modules_to_save as `<module>.modules_to_save.<param>`."""
    module, _, param = key.rpartition(".")
    return [f"{module}.modules_to_save.{param}"]


def task_type_for(model: torch.nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS")):
        if cls.endswith(suffix):
            return task
    return None


# --- config ---
def config_to_peft(config: MethodConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    if isinstance(config, LoraConfig):
        return {
            "alpha_pattern": {},
            "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": config.bias,
            "fan_in_fan_out": config.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": config.init_lora_weights,
            "layers_pattern": config.layers_pattern,
            "layers_to_transform": config.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "modules_to_save": config.modules_to_save,
            "peft_type": "LORA",
            "peft_version": PEFT_VERSION,
            "r": config.r,
            "rank_pattern": {},
            "revision": None,
            "target_modules": config.target_modules,
            "task_type": config.task_type,
            "use_dora": config.use_dora,
            "use_rslora": config.use_rslora,
        }
    peft_type = peft_type_of(config)
    if peft_type.startswith(OWN_PREFIX):
        return {**config.to_dict(), "peft_type": peft_type, "base_model_name_or_path": base_model_name_or_path,
                "inference_mode": True}
    raise AdapterLoadError(f"No PEFT file format is defined for method '{config.method}'.")


def config_from_peft(raw: dict[str, Any], where: str) -> MethodConfig:
    peft_type = raw.get("peft_type")
    if peft_type == "LORA":
        for key, neutral in _UNSUPPORTED_LORA.items():
            if raw.get(key, neutral) not in (neutral, None, {}, False):
                raise AdapterLoadError(f"{where} uses PEFT's '{key}' ({raw[key]!r}), which peftkit does not support yet.")
        fields = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "init_lora_weights",
                  "fan_in_fan_out", "target_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
                  "task_type")
        values = {k: raw[k] for k in fields if k in raw and raw[k] is not None}
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = sorted(values["target_modules"])
        if values.get("init_lora_weights") not in (True, False, "gaussian"):
            values["init_lora_weights"] = True  # only affects initialisation, which loading overwrites
        return LoraConfig(**values)
    if isinstance(peft_type, str) and peft_type.startswith(OWN_PREFIX):
        from ..errors import ConfigError
        from ..methods import get_method

        try:
            cls = get_method(peft_type[len(OWN_PREFIX):].lower()).config_class
            return cls.from_dict({k: v for k, v in raw.items() if k not in _NOT_CONFIG})
        except ConfigError as e:
            raise AdapterLoadError(f"{where} was written by a peftkit with other methods or settings: {e}") from e
    supported = ", ".join(sorted(set(_PEFT_TYPE.values())))
    raise AdapterLoadError(f"{where} has peft_type {peft_type!r}; peftkit reads these PEFT types: {supported}.")


# --- files ---
def save_adapter(method: Method, directory: str | os.PathLike, base_model_name_or_path: str | None) -> None:
    """Write `method`'s adapter into `directory` exactly as PEFT's `save_pretrained` would."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = method.config
    if config.task_type is None:
        config.task_type = task_type_for(method.model)
    peft_type = peft_type_of(config)
    tensors = {peft_key(k, peft_type): t.detach().contiguous().cpu() for k, t in method.state_dict().items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config_to_peft(config, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def read_config(directory: str | os.PathLike) -> MethodConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"No {CONFIG_NAME} in '{directory}': is this an adapter folder saved by peftkit or PEFT?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path} is not valid JSON ({e}); the file is corrupt: save the adapter again.") from e
    return config_from_peft(raw, str(path))


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        legacy = Path(directory) / LEGACY_WEIGHTS_NAME
        if legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
        raise AdapterLoadError(f"No {WEIGHTS_NAME} in '{directory}'.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterLoadError(
            f"{path} is corrupt or truncated ({e}); copy or save the adapter again."
        ) from e


def load_weights(method: Method, directory: str | os.PathLike) -> None:
    """Load the tensors in `directory` into an attached `method`, checking every name and shape."""
    peft_type = peft_type_of(method.config)
    file_tensors = read_weights(directory)
    to_internal = {peft_key(k, peft_type): k for k in method.state_dict()}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in file_tensors.items():
        if key in to_internal:
            state[to_internal[key]] = tensor
            continue
        for internal in to_internal.values():
            if key in _legacy_keys(peft_key(internal, peft_type)):
                state[internal] = tensor
                break
        else:
            if key.endswith(".base_layer.weight"):
                continue  # PEFT's save_embedding_layers copy of the base embedding: the base model already has it
            state[key] = tensor  # reported as unexpected below, under the file's own name
    from_internal = {v: k for k, v in to_internal.items()}
    method.load_state_dict(state, label=lambda k: from_internal.get(k, k))
