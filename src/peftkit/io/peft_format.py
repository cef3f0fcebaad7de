"""The only place that knows Hugging Face PEFT's file layout: `adapter_config.json` + `adapter_model.safetensors`.

Methods name their tensors in their own words; this module renames them to PEFT's keys on save and back on load,
so adapters move freely between peftkit, PEFT, vLLM and llama.cpp. What is particular to one method its own file
declares: its peft_type, config fields and tensor names on its config class (`MethodConfig.peft_type`, `to_peft`,
`from_peft`, `peft_tensor_names`), and which tensors it saves through `Method.export_state` / `adapt_loaded_state`
(AdaLoRA's pruned triplets). Adding a method that PEFT also has therefore touches only that method's file.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AdapterLoadError, ConfigError
from ..methods.base import Method, MethodConfig, available_methods, get_method
from .atomic import atomic_write

ADAPTER_CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# The PEFT release whose format we write; PEFT reads adapters of older and newer releases alike.
PEFT_VERSION = "0.21.2"
# PEFT's fields of every config (its PeftConfigMixin's), which describe the file rather than the method: written here,
# and not handed to the config classes when reading.
_PEFT_FILE_FIELDS = ("auto_mapping", "base_model_name_or_path", "inference_mode", "peft_type", "peft_version",
                     "revision")
# Methods PEFT lacks are saved with peft_type "PEFTKIT_<NAME>" (PEFT refuses to load them rather than mistaking them
# for its own) and their config's fields as they are.
OWN_PREFIX = "PEFTKIT_"
_OWN_FILE_FIELDS = ("peft_type", "base_model_name_or_path", "peft_version", "peftkit_version", "inference_mode",
                    "revision")


def peft_type_of(config: MethodConfig) -> str:
    return type(config).peft_type or OWN_PREFIX + config.method.upper()


def _config_classes() -> list[type[MethodConfig]]:
    return [get_method(name).config_class for name in available_methods()]


def reader_class(peft_type: Any) -> type[MethodConfig] | None:
    """The config class that reads PEFT files of `peft_type` (None: no method saves under that type).

    Where several classes share a peft_type (LoRA and LoRA-drop; prefix tuning and P-tuning v2), the most general one
    reads: the base class of the others. A PEFT file holds only what PEFT's type has, which the base class describes;
    its `from_peft` returns a subclass where the file tells them apart (prefix_projection false: P-tuning v2)."""
    sharing = [cls for cls in _config_classes() if isinstance(peft_type, str) and cls.peft_type == peft_type]
    readers = [cls for cls in sharing if all(issubclass(other, cls) for other in sharing)]
    if sharing and not readers:
        raise TypeError(f"{', '.join(sorted(c.__name__ for c in sharing))} share peft_type {peft_type!r}, but none "
                        "is the base class of the others, to read its files.")
    return readers[0] if readers else None


def _naming(config: type[MethodConfig] | str) -> type[MethodConfig]:
    """The class whose tensor names apply: `config` itself, or the reader of a peft_type (none: no renaming)."""
    return config if isinstance(config, type) else reader_class(config) or MethodConfig


def peft_key(internal: str, config: type[MethodConfig] | str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
    by the tensor names of `config` (a config class, or a peft_type)."""
    names = _naming(config)
    if names.peft_bare_keys:
        return internal.rsplit(".", 1)[-1]
    key = internal.replace(".saved.", ".")  # a modules_to_save copy is saved under the module's own name
    for ours, theirs in names.peft_tensor_names:
        if key.endswith(ours):
            key = key[: -len(ours)] + theirs
            break
    return PREFIX + key


def internal_key(key: str, config: type[MethodConfig] | str) -> str:
    """The inverse of `peft_key` for weight-space methods: a PEFT file's key -> our parameter name."""
    key = key.removeprefix(PREFIX)
    for ours, theirs in _naming(config).peft_tensor_names:
        if key.endswith(theirs):
            return key[: -len(theirs)] + ours
    return key


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
    """The adapter_config.json of `config`: its own fields (`to_peft`) and the file's."""
    fields = {"peft_type": peft_type_of(config), "base_model_name_or_path": base_model_name_or_path,
              "inference_mode": True}
    if type(config).peft_type is not None:
        fields.update(auto_mapping=None, peft_version=PEFT_VERSION, revision=None)
    return {**config.to_peft(), **fields}


def config_from_peft(raw: dict[str, Any], where: str) -> MethodConfig:
    peft_type = raw.get("peft_type")
    if isinstance(peft_type, str) and peft_type.startswith(OWN_PREFIX):
        try:
            cls = get_method(peft_type[len(OWN_PREFIX):].lower()).config_class
            return cls.from_peft({k: v for k, v in raw.items() if k not in _OWN_FILE_FIELDS}, where)
        except ConfigError as e:
            raise AdapterLoadError(f"{where} was written by a peftkit with other methods or settings: {e}") from e
    cls = reader_class(peft_type)
    if cls is None:
        supported = ", ".join(sorted({c.peft_type for c in _config_classes() if c.peft_type is not None}))
        raise AdapterLoadError(f"{where} has peft_type {peft_type!r}; peftkit reads these PEFT types: {supported}.")
    return cls.from_peft({k: v for k, v in raw.items() if k not in _PEFT_FILE_FIELDS}, where)


# --- files ---
def save_method(method: Method, directory: str | os.PathLike, base_model_name_or_path: str | None) -> None:
    """Write a trained method: its own files when it has them (full fine-tuning's model folder), else a PEFT adapter."""
    if method.writes_own_files:
        # An adapter left beside a model makes transformers load the adapter's base model instead of this one.
        for name in (ADAPTER_CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
            (Path(directory) / name).unlink(missing_ok=True)
        method.save(directory, base_model_name_or_path)
    else:
        save_adapter(method, directory, base_model_name_or_path)


def save_adapter(method: Method, directory: str | os.PathLike, base_model_name_or_path: str | None) -> None:
    """Write `method`'s adapter into `directory` exactly as PEFT's `save_pretrained` would."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = method.config
    if config.task_type is None:
        config.task_type = task_type_for(method.model)
    tensors = {peft_key(k, type(config)): t.detach().contiguous().cpu() for k, t in method.export_state().items()}
    seen: set[int] = set()
    for key, t in tensors.items():  # a tensor tied across layers (LoRA-drop): safetensors wants each key its own copy
        if t.untyped_storage().data_ptr() in seen:
            tensors[key] = t.clone()
        seen.add(t.untyped_storage().data_ptr())
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config_to_peft(config, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    atomic_write(out / ADAPTER_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def read_config(directory: str | os.PathLike) -> MethodConfig:
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not Path(directory).is_dir():
        what = "is a file, not an adapter folder" if Path(directory).exists() else "does not exist"
        raise AdapterLoadError(f"The adapter path '{directory}' {what}; pass the folder holding {ADAPTER_CONFIG_NAME}.")
    if not path.is_file():
        if (Path(directory) / "config.json").is_file():
            raise AdapterLoadError(f"'{directory}' is a full model folder (config.json, no {ADAPTER_CONFIG_NAME}), "
                                   "e.g. the output of finetuning_type: full: pass it as the model "
                                   "(model_name_or_path, --model), not as an adapter.")
        raise AdapterLoadError(f"No {ADAPTER_CONFIG_NAME} in '{directory}': is this an adapter folder saved by "
                               "peftkit or PEFT?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path} is not valid JSON ({e}); the file is corrupt: save the adapter again.") from e
    return config_from_peft(raw, str(path))


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    legacy = Path(directory) / LEGACY_WEIGHTS_NAME
    if not path.is_file() and not legacy.is_file():
        raise AdapterLoadError(f"No {WEIGHTS_NAME} in '{directory}'.")
    if not path.is_file():
        path = legacy
    try:
        tensors = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                   weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise AdapterLoadError(
            f"{path} is corrupt or truncated ({e}); copy or save the adapter again."
        ) from e
    for key, t in tensors.items():  # a diverged run saves NaN weights, which would only show as garbage output
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterLoadError(f"{path}: tensor '{key}' holds NaN or infinite values (the training run diverged); "
                                   "retrain with a lower learning_rate, or load an earlier checkpoint.")
    return tensors


def load_weights(method: Method, directory: str | os.PathLike) -> None:
    """Load the tensors in `directory` into an attached `method`, checking every name and shape."""
    names = type(method.config)
    file_tensors = read_weights(directory)
    to_internal = {peft_key(k, names): k for k in method.state_dict()}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in file_tensors.items():
        if key in to_internal:
            state[to_internal[key]] = tensor
            continue
        for internal in to_internal.values():
            if key in _legacy_keys(peft_key(internal, names)):
                state[internal] = tensor
                break
        else:
            if key.endswith(".base_layer.weight"):
                continue  # PEFT's save_embedding_layers copy of the base embedding: the base model already has it
            state[key] = tensor  # reported as unexpected below, under the file's own name
    state = method.adapt_loaded_state(state, lambda: read_config(directory))
    from_internal = {v: k for k, v in to_internal.items()}
    method.load_state_dict(state, label=lambda k: from_internal.get(k, k))
