"""The only place that knows Hugging Face PEFT's file layout: `adapter_config.json` + `adapter_model.safetensors`.

Methods name their tensors in their own words; this module renames them to PEFT's keys on save and back on load,
so adapters move freely between peftkit, PEFT, vLLM and llama.cpp.
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

from ..errors import AdapterLoadError
from ..methods.adalora import AdaLoraConfig
from ..methods.base import Method, MethodConfig
from ..methods.ia3 import Ia3Config
from ..methods.lora import LoraConfig
from ..methods.prefix import PrefixTuningConfig, PTuningV2Config
from ..methods.prompt import PromptTuningConfig, PTuningConfig
from .atomic import atomic_write

ADAPTER_CONFIG_NAME = "adapter_config.json"
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
    "IA3": [(".ia3_scale", ".ia3_l")],
    # AdaLoRA: our names are PEFT's (no ".weight": PEFT keeps them in ParameterDicts); ranknum is not saved.
    "ADALORA": [(".lora_A", ".lora_A"), (".lora_E", ".lora_E"), (".lora_B", ".lora_B")],
}
# our method name -> PEFT's peft_type, for the methods PEFT also has
_PEFT_TYPE = {"lora": "LORA", "ia3": "IA3", "adalora": "ADALORA", "prompt_tuning": "PROMPT_TUNING",
              "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING", "p_tuning_v2": "PREFIX_TUNING"}
# Prompt-learning types hold one tensor, saved under the bare key "prompt_embeddings".
_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
_PROMPT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
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
    if peft_type in _PROMPT_TYPES:
        return internal.rsplit(".", 1)[-1]
    key = internal.replace(".saved.", ".")  # a modules_to_save copy is saved under the module's own name
    for ours, theirs in _SUFFIXES.get(peft_type, []):
        if key.endswith(ours):
            key = key[: -len(ours)] + theirs
            break
    return PREFIX + key


def internal_key(key: str, peft_type: str) -> str:
    """The inverse of `peft_key` for weight-space methods: a PEFT file's key -> our parameter name."""
    key = key.removeprefix(PREFIX)
    for ours, theirs in _SUFFIXES.get(peft_type, []):
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
    if isinstance(config, Ia3Config):
        return {
            "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path,
            "exclude_modules": config.exclude_modules,
            "fan_in_fan_out": config.fan_in_fan_out,
            "feedforward_modules": config.feedforward_modules,
            "inference_mode": True,
            "init_ia3_weights": config.init_ia3_weights,
            "modules_to_save": config.modules_to_save,
            "peft_type": "IA3",
            "peft_version": PEFT_VERSION,
            "revision": None,
            "target_modules": config.target_modules,
            "task_type": config.task_type,
        }
    if isinstance(config, AdaLoraConfig):
        return _adalora_config_to_peft(config, base_model_name_or_path)
    if peft_type_of(config) in _PROMPT_TYPES:
        return _prompt_config_to_peft(config, base_model_name_or_path)
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
                raise AdapterLoadError(f"{where} uses PEFT's '{key}' ({raw[key]!r}), "
                                       "which peftkit does not support yet.")
        fields = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "init_lora_weights",
                  "fan_in_fan_out", "target_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
                  "task_type")
        values = {k: raw[k] for k in fields if k in raw and raw[k] is not None}
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = sorted(values["target_modules"])
        if values.get("init_lora_weights") not in (True, False, "gaussian"):
            values["init_lora_weights"] = True  # only affects initialisation, which loading overwrites
        return LoraConfig(**values)
    if peft_type == "IA3":
        return _ia3_config_from_peft(raw, where)
    if peft_type == "ADALORA":
        return _adalora_config_from_peft(raw, where)
    if peft_type in _PROMPT_TYPES:
        return _prompt_config_from_peft(raw, where)
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


_IA3_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save",
               "init_ia3_weights", "task_type")
_PEFT_BASE_FIELDS = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                     "inference_mode")


def _ia3_config_from_peft(raw: dict[str, Any], where: str) -> Ia3Config:
    """PEFT 0.21's IA3 config has nothing we lack; a field of a later release that is set (not null/false/empty)
    may change the maths, so it is refused rather than ignored."""
    for key, value in raw.items():
        if key not in _IA3_FIELDS and key not in _PEFT_BASE_FIELDS and value not in (None, False, {}, []):
            raise AdapterLoadError(f"{where} uses PEFT's IA3 setting '{key}' ({value!r}), which peftkit does not "
                                   "support.")
    values = {k: raw[k] for k in _IA3_FIELDS if raw.get(k) is not None}
    for key in ("target_modules", "feedforward_modules", "exclude_modules"):
        if isinstance(values.get(key), list):
            values[key] = sorted(values[key])
        elif isinstance(values.get(key), str) and values[key] != "all-linear":
            values[key] = f"(?:{values[key]})"  # a regex to PEFT even without regex characters, which Ia3Config splits
    values["init_ia3_weights"] = True  # only affects initialisation, which loading overwrites
    return Ia3Config(**values)


# --- prompt learning: PEFT's PromptLearningConfig fields plus each type's own ---
_PROMPT_FIELDS = ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
                  "task_type")


def _prompt_config_to_peft(config: MethodConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    out = {"auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
           "modules_to_save": None, "peft_type": peft_type_of(config), "peft_version": PEFT_VERSION, "revision": None,
           **{k: getattr(config, k) for k in _PROMPT_FIELDS}}
    if isinstance(config, PromptTuningConfig):
        out.update(prompt_tuning_init=_PROMPT_INIT[config.prompt_tuning_init],
                   prompt_tuning_init_text=config.prompt_tuning_init_text,
                   tokenizer_name_or_path=config.tokenizer_name_or_path, tokenizer_kwargs=None)
    elif isinstance(config, PTuningConfig):
        out.update(encoder_reparameterization_type=config.encoder_reparameterization_type.upper(),
                   encoder_hidden_size=config.encoder_hidden_size, encoder_num_layers=config.encoder_num_layers,
                   encoder_dropout=config.encoder_dropout)
    else:
        out.update(prefix_projection=config.prefix_projection, encoder_hidden_size=config.encoder_hidden_size,
                   init_weights=None)
    return out


def _prompt_config_from_peft(raw: dict[str, Any], where: str) -> MethodConfig:
    """A loaded prompt adapter is fixed values (PEFT's inference mode): P-tuning's encoder and prefix tuning's MLP are
    not in the file, only their output."""
    from ..errors import ConfigError

    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterLoadError(f"{where} is a {raw['peft_type']} adapter for task_type {raw['task_type']!r}; peftkit's "
                               "virtual tokens are for causal language models (CAUSAL_LM).")
    values = {k: raw[k] for k in _PROMPT_FIELDS if raw.get(k) is not None}
    try:
        if raw["peft_type"] == "PROMPT_TUNING":
            init = {v: k for k, v in _PROMPT_INIT.items()}.get(str(raw.get("prompt_tuning_init", "RANDOM")).upper())
            return PromptTuningConfig(**values, inference_mode=True, prompt_tuning_init=init or "random",
                                      prompt_tuning_init_text=raw.get("prompt_tuning_init_text") or None,
                                      tokenizer_name_or_path=raw.get("tokenizer_name_or_path"))
        if raw["peft_type"] == "P_TUNING":
            return PTuningConfig(**values, inference_mode=True,
                                 encoder_reparameterization_type=raw.get("encoder_reparameterization_type") or "mlp")
        if raw.get("prefix_projection"):
            return PrefixTuningConfig(**values, prefix_projection=True, inference_mode=True)
        return PTuningV2Config(**values, inference_mode=True)
    except ConfigError as e:
        raise AdapterLoadError(f"{where} holds a {raw['peft_type']} config peftkit cannot use: {e}") from e


# --- AdaLoRA: PEFT saves only the triplets its rank_pattern keeps ---
_ADALORA_ROWS = (("lora_A", 0), ("lora_E", 0), ("lora_B", 1))  # tensor, and the dimension that indexes triplets
_ADALORA_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                   "lora_alpha", "lora_dropout", "fan_in_fan_out", "target_modules", "layers_to_transform",
                   "layers_pattern", "modules_to_save", "task_type")


def _adalora_config_to_peft(config: AdaLoraConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    pattern = config.rank_pattern
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "bias": "none",
        "deltaT": config.deltaT,
        "fan_in_fan_out": config.fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": config.init_lora_weights,
        "init_r": config.init_r,
        "layers_pattern": config.layers_pattern,
        "layers_to_transform": config.layers_to_transform,
        "loftq_config": {},
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": config.modules_to_save,
        "orth_reg_weight": config.orth_reg_weight,
        "peft_type": "ADALORA",
        "peft_version": PEFT_VERSION,
        "r": 8,  # LoraConfig's default, unused by AdaLoRA (PEFT warns when it is anything else)
        "rank_pattern": None if pattern is None else {f"{path}.lora_E": list(mask) for path, mask in pattern.items()},
        "revision": None,
        "target_modules": config.target_modules,
        "target_r": config.target_r,
        "task_type": config.task_type,
        "tfinal": config.tfinal,
        "tinit": config.tinit,
        "total_step": config.total_step,
        "use_dora": False,
        "use_rslora": False,
    }


def _adalora_config_from_peft(raw: dict[str, Any], where: str) -> AdaLoraConfig:
    unsupported = {**{k: v for k, v in _UNSUPPORTED_LORA.items() if k != "rank_pattern"}, "bias": "none"}
    for key, neutral in unsupported.items():
        if raw.get(key, neutral) not in (neutral, None, {}, False):
            raise AdapterLoadError(f"{where} uses PEFT's '{key}' ({raw[key]!r}), which peftkit's AdaLoRA does not "
                                   "support.")
    values = {k: raw[k] for k in _ADALORA_FIELDS if raw.get(k) is not None}
    if isinstance(values.get("target_modules"), list):
        values["target_modules"] = sorted(values["target_modules"])
    if raw.get("rank_pattern"):  # {"<module>.lora_E": [bool] * init_r}; older files may keep the adapter name
        values["rank_pattern"] = {k.rsplit(".lora_E", 1)[0]: [bool(b) for b in mask]
                                  for k, mask in raw["rank_pattern"].items()}
    from ..errors import ConfigError

    try:
        return AdaLoraConfig(**values)
    except ConfigError as e:
        raise AdapterLoadError(f"{where} holds an AdaLoRA config peftkit cannot use: {e}") from e


def _adalora_prune(config: AdaLoraConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the triplets `rank_pattern` keeps, as PEFT's get_peft_model_state_dict does (a layer already built
    at its pruned size, i.e. loaded, is written as it is)."""
    state = dict(state)
    for path, mask in (config.rank_pattern or {}).items():
        keep = torch.tensor(mask, dtype=torch.bool)
        for name, dim in _ADALORA_ROWS:
            t = state.get(f"{path}.{name}")
            if t is not None and t.shape[dim] == len(mask):
                state[f"{path}.{name}"] = t[keep.to(t.device)] if dim == 0 else t[:, keep.to(t.device)]
    return state


def _adalora_unprune(
    method: Method, state: dict[str, torch.Tensor], directory: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """Put a pruned file's triplets back in place when the layers are at full rank (resuming a run from a
    checkpoint): pruned triplets come back as zeros, and the file's rank pattern becomes the method's."""
    pattern = read_config(directory).rank_pattern
    if not pattern:
        return state
    live = method.state_dict()
    state = dict(state)
    for path, mask in pattern.items():
        keep = torch.tensor(mask, dtype=torch.bool)
        for name, dim in _ADALORA_ROWS:
            key = f"{path}.{name}"
            if key in state and key in live and live[key].shape[dim] == len(mask) != state[key].shape[dim] \
                    and state[key].shape[dim] == int(keep.sum()):
                full = torch.zeros(live[key].shape, dtype=state[key].dtype)
                if dim == 0:
                    full[keep] = state[key]
                else:
                    full[:, keep] = state[key]
                state[key] = full
    method.config.rank_pattern = pattern
    return state


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
    peft_type = peft_type_of(config)
    state = method.export_state()
    if peft_type == "ADALORA":
        state = _adalora_prune(config, state)
    tensors = {peft_key(k, peft_type): t.detach().contiguous().cpu() for k, t in state.items()}
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
            if peft_type == "ADALORA" and key.endswith(".ranknum"):
                continue  # written by some PEFT releases; always init_r, which the config already gives
            state[key] = tensor  # reported as unexpected below, under the file's own name
    if peft_type == "ADALORA":
        state = _adalora_unprune(method, state, directory)
    from_internal = {v: k for k, v in to_internal.items()}
    method.load_state_dict(state, label=lambda k: from_internal.get(k, k))
