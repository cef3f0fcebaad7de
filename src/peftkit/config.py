"""One YAML file plus `key=value` overrides -> one typed, validated `TrainConfig`, before any model is loaded.

Training keys are Hugging Face `TrainingArguments` names; model, data and method keys are LLaMA-Factory's, so its
example YAML files load unchanged. Every check and its error message lives here, so a run never fails an hour in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import yaml

from .errors import ConfigError

if TYPE_CHECKING:
    from .methods import MethodConfig
    from .quantization import QuantizationConfig

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
EVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("steps", "epoch", "no")
STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto")  # LLaMA-Factory's
INFER_DTYPES = ("auto", "float32", "float16", "bfloat16")
EXPORT_FORMATS = ("hf", "gguf", "ollama", "gguf_lora")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # export/gguf.py maps them onto ggml types
EXPORT_DEVICES = ("cpu", "auto")  # LLaMA-Factory's: where the merge runs

_NOT_HERE = "single-device training only; multi-GPU settings have no effect"
_NO_MEDIA = "text-only models for now; multimodal settings have no effect"
_NO_HUB = "uploading is not supported (no network); push the output_dir yourself"
_NO_GPTQ = "GPTQ export is not supported; export_format: gguf with export_gguf_type: q4_0 or q8_0 quantizes instead"
# Keys from LLaMA-Factory configs that are accepted so its files load, with a warning saying why they do nothing.
IGNORED_KEYS: dict[str, str] = {
    "ddp_timeout": _NOT_HERE, "ddp_find_unused_parameters": _NOT_HERE, "deepspeed": _NOT_HERE, "fsdp": _NOT_HERE,
    "fsdp_config": _NOT_HERE, "ray_run_name": _NOT_HERE,
    "flash_attn": "attention uses transformers' default implementation for the model",
    "enable_liger_kernel": "Liger kernels are not used", "use_unsloth": "Unsloth is not used",
    "preprocessing_batch_size": "tokenization is not batched by this setting",
    "dataloader_pin_memory": "memory pinning is not configurable",
    "push_to_hub": _NO_HUB, "hub_model_id": _NO_HUB, "hub_strategy": _NO_HUB, "hub_private_repo": _NO_HUB,
    "tokenized_path": "data is tokenized at the start of each run; saving tokenized data is not implemented",
    "streaming": "datasets are loaded into memory; streaming is not implemented",
    "neat_packing": "`packing` is always neat here (packed examples never attend to each other); "
    "neat_packing: true turns packing on",
    "include_num_input_tokens_seen": "tokens per second are always logged",
    "image_max_pixels": _NO_MEDIA, "video_max_pixels": _NO_MEDIA, "freeze_vision_tower": _NO_MEDIA,
    "media_dir": _NO_MEDIA,
    "export_quantization_nsamples": _NO_GPTQ, "export_quantization_maxlen": _NO_GPTQ,
    "predict_with_generate": "predict always generates", "run_name": "runs are named by output_dir",
    "logging_dir": "logs go to output_dir/trainer_log.jsonl",
}
_ALIASES = {"evaluation_strategy": "eval_strategy"}  # old TrainingArguments name -> current


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run, flat as in LLaMA-Factory's YAML; built by `load_config`, validated on creation."""

    # --- model ---
    model_name_or_path: str | None = None  # required: a hub id or local folder (None only to give a clear error)
    adapter_name_or_path: str | None = None  # continue training, or export, this adapter
    trust_remote_code: bool = False
    quantization_bit: int | None = None  # 4 (QLoRA) or 8 (LLM.int8): the base model's linear layers in k bits
    quantization_type: str = "nf4"  # 4-bit data type: nf4 | fp4
    double_quantization: bool = True  # 4-bit: quantize the quantization constants too (~0.37 bits/param saved)
    quantization_method: str = "bnb"  # bitsandbytes, the only backend
    # --- method ---
    stage: str = "sft"
    finetuning_type: str = "lora"  # a name from peftkit.available_methods()
    lora_rank: int = 8
    lora_alpha: float | None = None  # None -> 2 * lora_rank, as in LLaMA-Factory
    lora_dropout: float = 0.0
    lora_target: str | list[str] | None = "all"  # "all": every linear layer; "q_proj,v_proj"; None/"default": per model
    target_modules: str | list[str] | None = None  # PEFT's name, for any method; None: the method's own default
    additional_target: list[str] | None = None  # modules trained in full and saved with the adapter (modules_to_save)
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float | None = None  # LoRA+: lora_B learns at learning_rate x this (16 is the paper's)
    loraplus_lr_embedding: float = 1e-6  # LoRA+: learning rate of embedding LoRA's B
    lora_drop_sample_ratio: float = 0.1  # LoRA-drop: share of the training data for the selection phase
    lora_drop_threshold: float = 0.9  # LoRA-drop: keep the most important layers up to this share of importance
    lora_drop_steps: int | None = None  # LoRA-drop: selection-phase steps; None: one pass over the sample
    init_r: int = 12  # AdaLoRA: starting rank of every module
    target_r: int = 8  # AdaLoRA: average rank at the end of the budget schedule
    tinit: int = 0  # AdaLoRA: steps of warm-up before pruning starts
    tfinal: int = 0  # AdaLoRA: steps at the end with the final budget fixed
    deltaT: int = 1  # AdaLoRA: steps between two budget allocations
    adalora_beta1: float = 0.85  # AdaLoRA: EMA factor of the sensitivity
    adalora_beta2: float = 0.85  # AdaLoRA: EMA factor of the uncertainty
    orth_reg_weight: float = 0.5  # AdaLoRA: weight of the orthogonality regulariser
    feedforward_modules: str | list[str] | None = None  # IA3: targets whose input (not output) is scaled
    adapter_type: str = "houlsby"  # bottleneck adapters: houlsby | pfeiffer
    adapter_size: int | None = None  # bottleneck width; None: hidden_size / reduction_factor
    reduction_factor: float = 16  # bottleneck adapters
    adapter_non_linearity: str = "relu"  # bottleneck adapters: relu | gelu | silu | tanh
    freeze_trainable_layers: int = 2  # freeze: train the last N layers (negative: the first N)
    freeze_trainable_modules: str | list[str] = "all"  # freeze: module names inside those layers, or all
    # freeze: modules outside the layers to train, e.g. embed_tokens
    freeze_extra_modules: str | list[str] | None = None
    num_virtual_tokens: int = 20  # prompt_tuning, p_tuning, prefix_tuning, p_tuning_v2
    prompt_tuning_init: str = "vocab"  # prompt_tuning: random | vocab | text
    prompt_tuning_init_text: str | None = None  # prompt_tuning with init text: the phrase
    encoder_reparameterization_type: str = "mlp"  # p_tuning: mlp | lstm
    encoder_hidden_size: int | None = None  # p_tuning / prefix_tuning: the encoder's width
    encoder_num_layers: int = 2  # p_tuning: LSTM layers
    encoder_dropout: float = 0.0  # p_tuning: dropout between LSTM layers
    prefix_projection: bool = True  # prefix_tuning: train the prefixes through an MLP
    prefix_init: str = "vocab"  # p_tuning_v2: vocab (the model's keys/values of random tokens) | random
    # --- data ---
    dataset: list[str] | None = None  # names in dataset_dir/dataset_info.json; "a,b" is split
    eval_dataset: list[str] | None = None
    dataset_dir: str = "data"
    template: str | None = None  # None: the tokenizer's own chat template
    cutoff_len: int = 2048
    max_samples: int | None = None
    val_size: int | float = 0.0  # a fraction in [0, 1), or a count >= 1, of `dataset` held out for evaluation
    packing: bool = False  # always "neat": packed examples never attend to each other
    padding_free: bool = True  # a micro-batch is one unpadded row with per-example attention (varlen.py)
    train_on_prompt: bool = False
    mask_history: bool = False
    enable_thinking: bool = True  # reasoning templates (qwen3, deepseekr1): train the think block; False drops it
    overwrite_cache: bool = False
    preprocessing_num_workers: int | None = None
    dataloader_num_workers: int = 0
    # --- training (TrainingArguments) ---
    do_train: bool | None = None  # None: true when `dataset` is set (LLaMA-Factory's predict configs set none)
    do_eval: bool = False
    do_predict: bool = False
    output_dir: str = "saves/run"
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch"  # the only optimizer; other names warn and fall back to it
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping
    logging_steps: int = 10
    eval_strategy: str = "no"
    eval_steps: int | None = None  # None -> logging_steps, as in TrainingArguments
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    save_only_model: bool = False  # checkpoints hold only the adapter: smaller, but training cannot resume from them
    load_best_model_at_end: bool = False
    metric_for_best_model: str = "eval_loss"  # the eval metric load_best_model_at_end compares ("loss" = eval_loss)
    greater_is_better: bool | None = None  # None: lower is better for a metric ending in "loss", higher otherwise
    resume_from_checkpoint: str | bool | None = None  # a checkpoint folder, or true for the newest in output_dir
    # resume even though settings that change the result differ from the checkpoint's
    resume_allow_changes: bool = False
    seed: int = 42
    bf16: bool | None = None  # None: bf16 where the device supports it
    fp16: bool = False
    gradient_checkpointing: bool = False
    report_to: str | list[str] = "none"  # only "none": metrics go to output_dir/trainer_log.jsonl
    plot_loss: bool = False
    # --- generation and export ---
    max_new_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool = False
    export_dir: str | None = None
    export_size: int = 5  # shard size in GB
    export_format: str = "hf"  # hf folder | gguf file | ollama (gguf + Modelfile) | gguf_lora (llama.cpp LoRA adapter)
    export_gguf_type: str = "f16"  # the GGUF's weight type (norms stay f32)
    ollama_system: str | None = None  # a SYSTEM line for the Modelfile; the template's default system otherwise
    export_device: str = "cpu"  # where the merge runs: cpu, or auto (the GPU when there is one: faster)
    export_legacy_format: bool = False  # hf: also write PyTorch .bin weights beside the safetensors, for older tools
    export_quantization_bit: int | None = None  # LLaMA-Factory's GPTQ export: refused, naming gguf q4_0/q8_0 instead
    export_quantization_dataset: str | None = None  # GPTQ calibration data: refused with export_quantization_bit
    export_hub_model_id: str | None = None  # upload after export: refused (no network); upload export_dir yourself
    infer_dtype: str = "auto"

    def __post_init__(self) -> None:
        _validate(self)
        self._check_method_keys()

    def quantization(self) -> QuantizationConfig | None:
        """The base model's quantization, or None for a full-precision base."""
        from .quantization import QuantizationConfig

        if self.quantization_bit is None:
            return None
        return QuantizationConfig(self.quantization_bit, self.quantization_type, self.double_quantization)

    def method_config(self) -> MethodConfig:
        """The `finetuning_type` method's config, from the keys its config class declares (`yaml_keys`)."""
        from .methods import get_method

        cls = get_method(self.finetuning_type).config_class
        values = {field: getattr(self, key) for key, field in cls.yaml_keys.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        if "lora_alpha" in values and values["lora_alpha"] is None:
            values["lora_alpha"] = 2 * self.lora_rank  # LLaMA-Factory's default
        if "target_modules" in names:
            target = self.target_modules
            if target is None and "lora_target" in cls.yaml_keys:
                target = self.lora_target
            values["target_modules"] = _targets(target)
        if "modules_to_save" in names:
            values["modules_to_save"] = self.additional_target or None
        if "tokenizer_name_or_path" in names:  # prompt tuning's text init tokenizes with the model's tokenizer
            values["tokenizer_name_or_path"] = self.model_name_or_path
        return cls(**values)

    def _check_method_keys(self) -> None:
        """Build the method config now, so impossible values fail before any work; warn about keys set for another
        method (e.g. `lora_rank` with `finetuning_type: ia3`), which would otherwise be silently ignored."""
        from .methods import get_method, method_keys

        self.method_config()
        own = set(get_method(self.finetuning_type).config_class.yaml_keys)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, methods in method_keys().items():
            if key not in own and getattr(self, key) != defaults[key]:
                warnings.warn(f"{key} is a setting of {', '.join(methods)}, not of finetuning_type "
                              f"'{self.finetuning_type}': it is ignored.", UserWarning, stacklevel=4)

    def ignored_settings(self) -> list[str]:
        """Settings kept in the config (LLaMA-Factory's files set them) that a run does not use, with the reason."""
        reasons = {"preprocessing_num_workers": "tokenization runs in this process, and its result is cached",
                   "dataloader_num_workers": "batches are built in the training process"}
        return [f"Ignoring {key}={getattr(self, key)}: {why}." for key, why in reasons.items() if getattr(self, key)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, saved into checkpoints so a run can be reproduced."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Flat `key: value` pairs -> config: old names renamed, LLaMA-Factory-only keys warned about, others
        refused."""
        values = _rename_aliases(values)
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in [k for k in values if k not in fields]:
            if key not in IGNORED_KEYS:
                known = sorted(fields | IGNORED_KEYS.keys() | _ALIASES.keys())
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else " See peftkit.config.TrainConfig for valid keys."
                raise ConfigError(f"Unknown key '{key}'.{hint}")
            value = values.pop(key)
            if value is None:  # explicitly off: nothing to warn about
                continue
            if key == "neat_packing" and value is True:
                values["packing"] = True
            warnings.warn(f"Ignoring {key}={value!r}: {IGNORED_KEYS[key]}.", UserWarning, stacklevel=3)
        return cls(**values)


def _targets(target: str | list[str] | None) -> str | list[str] | None:
    """LLaMA-Factory's target spellings -> PEFT's: "all" -> "all-linear", "a,b" -> [a, b], "default"/"" -> None."""
    if target in ("all", "all-linear"):
        return "all-linear"
    if isinstance(target, str) and not _is_regex(target):
        return [t.strip() for t in target.split(",") if t.strip() and t.strip() != "default"] or None
    return target


def _is_regex(text: str) -> bool:
    return any(ch in text for ch in "*+?[]()|\\^$")


def load_config(path: str | Path | None, overrides: Sequence[str] = (), **kw: Any) -> TrainConfig:
    """The YAML file, then `key=value` overrides, then keyword arguments; later ones win."""
    values = _rename_aliases(_read_yaml(path)) if path else {}
    values.update(_rename_aliases(parse_overrides(overrides)))
    values.update(_rename_aliases(kw))
    return TrainConfig.from_dict(values)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["learning_rate=5e-5", "packing=true"]` -> a dict; each value is read as YAML, so `true` and `[a, b]` work."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ConfigError(f"Override '{item}' is not key=value; write e.g. learning_rate=5e-5, without spaces.")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw  # e.g. a path with YAML-special characters: keep the text as given
    return out


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists() or p.is_dir():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"Config file '{p}' {what}. Check the path, or pass only key=value settings.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"Config file '{p}' is not valid YAML{where}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"Config file '{p}' must hold `key: value` lines at the top level, not a {kind}.")
    return data


def _rename_aliases(values: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(values)
    for old, new in _ALIASES.items():
        if old in values:
            if new in values:
                raise ConfigError(f"Both {old} and {new} are set; keep only {new} ({old} is its old name).")
            warnings.warn(f"{old} is the old name of {new}; please rename it.", UserWarning, stacklevel=3)
            values[new] = values.pop(old)
    return values


# --- types: what YAML and the command line produce -> the field's type ---
_BAD = object()
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list of strings (or 'a,b')", dict: "a mapping"}


def _convert(value: Any, kind: type) -> Any:
    """`value` as `kind`, or _BAD. PyYAML reads `5e-5` as a string, so numeric strings count as numbers."""
    if kind is bool:
        text = str(value).lower()
        return value if isinstance(value, bool) else (text == "true") if text in ("true", "false") else _BAD
    if isinstance(value, bool):  # a bool is an int to Python, but `lora_rank: true` is a mistake
        return _BAD
    if kind in (int, float) and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    if kind is int and (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        return int(value)
    if kind is str and isinstance(value, (str, int)):
        return str(value)
    if kind is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if kind is list and isinstance(value, (list, tuple)) and all(type(v) in (str, int) for v in value):
        return [str(v).strip() for v in value]
    if kind is dict and isinstance(value, str):  # a JSON or YAML mapping, as TrainingArguments accepts
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(value)
    if kind is dict and (value is None or isinstance(value, dict)):
        return dict(value or {})
    return _BAD


def _coerce(key: str, value: Any, tp: Any) -> Any:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    kinds = [typing.get_origin(a) or a for a in (typing.get_args(tp) if union else (tp,))]
    if value is None and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is not type(None) and (out := _convert(value, kind)) is not _BAD:
            return out
    names = [_TYPE_NAMES.get(k, "null") for k in kinds]
    raise ConfigError(f"{key} must be {' or '.join(names)}, got {value!r}.")


# --- values: (key, test, what the value must be); None values are not tested ---
_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("learning_rate", lambda v: v > 0, "greater than 0 (e.g. 1e-4)"),
    *[(k, lambda v: v >= 1, "at least 1") for k in (
        "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "cutoff_len",
        "lora_rank", "logging_steps", "save_steps", "eval_steps", "save_total_limit", "max_samples", "export_size",
        "max_new_tokens")],
    *[(k, lambda v: v >= 0, "at least 0") for k in (
        "weight_decay", "warmup_steps", "max_grad_norm", "dataloader_num_workers", "preprocessing_num_workers",
        "temperature", "top_k")],
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_epsilon", lambda v: v > 0, "greater than 0"),
    ("top_p", lambda v: 0 <= v <= 1, "in [0, 1] (0: only the most likely token)"),
    ("repetition_penalty", lambda v: v > 0, "greater than 0"),
    ("val_size", lambda v: 0 <= v < 1 or (v >= 1 and float(v).is_integer()), "a fraction in [0, 1) or a count >= 1"),
]


def _check_choice(key: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), list(options), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key} '{value}' is not one of: {', '.join(options)}.{hint}")


def _validate(c: TrainConfig) -> None:
    """Types first, then each value, then combinations; fills the defaults that depend on other keys."""
    for f in dataclasses.fields(c):
        setattr(c, f.name, _coerce(f.name, getattr(c, f.name), _HINTS[f.name]))
    if not c.model_name_or_path:
        raise ConfigError("model_name_or_path is required: a Hugging Face hub id or a local model folder.")
    for key, ok, must in _RULES:
        value = getattr(c, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key} must be {must}, got {value!r}.")
    if c.val_size >= 1:
        c.val_size = int(c.val_size)
    if isinstance(c.resume_from_checkpoint, str) and c.resume_from_checkpoint.lower() in ("true", "false"):
        c.resume_from_checkpoint = c.resume_from_checkpoint.lower() == "true"

    from .objectives import available_objectives

    if c.stage not in available_objectives():
        verb = "is not supported yet" if c.stage in STAGES else "is unknown"
        raise ConfigError(f"stage '{c.stage}' {verb}: LLaMA-Factory's stages are {', '.join(STAGES)}; "
                          f"supported here: {', '.join(available_objectives())}.")
    try:
        from .methods import available_methods
    except ImportError:  # the method registry is checked again when the method is built
        pass
    else:
        _check_choice("finetuning_type", c.finetuning_type, available_methods())
    for key, options in (("lr_scheduler_type", LR_SCHEDULERS), ("eval_strategy", EVAL_STRATEGIES),
                         ("save_strategy", SAVE_STRATEGIES), ("infer_dtype", INFER_DTYPES),
                         ("export_format", EXPORT_FORMATS), ("export_gguf_type", GGUF_TYPES),
                         ("export_device", EXPORT_DEVICES)):
        _check_choice(key, getattr(c, key), options)
    if c.optim != "adamw_torch":
        warnings.warn(f"optim '{c.optim}' is not supported; using adamw_torch (torch.optim.AdamW).", stacklevel=2)
        c.optim = "adamw_torch"
    reporters = [c.report_to] if isinstance(c.report_to, str) else c.report_to
    if any(r != "none" for r in reporters):
        warnings.warn(f"report_to={c.report_to!r} is not supported; metrics go to output_dir/trainer_log.jsonl "
                      "(set plot_loss: true for a loss plot).", stacklevel=2)

    if c.quantization_method not in ("bnb", "bitsandbytes"):
        raise ConfigError(f"quantization_method '{c.quantization_method}' is not supported; use bnb (bitsandbytes).")
    if c.quantization() is not None:
        from .methods import get_method

        if get_method(c.finetuning_type).in_place:
            raise ConfigError(f"finetuning_type '{c.finetuning_type}' trains the base weights themselves, which "
                              f"quantization_bit: {c.quantization_bit} stores frozen in {c.quantization_bit} bits; use "
                              "finetuning_type: lora (QLoRA), or remove quantization_bit.")
    if c.max_steps < -1:
        raise ConfigError(f"max_steps must be a number of steps > 0, or -1 (or 0) to train num_train_epochs epochs; "
                          f"got {c.max_steps}.")
    if c.num_train_epochs <= 0 and c.max_steps <= 0:
        raise ConfigError(f"Nothing to train: num_train_epochs is {c.num_train_epochs} and max_steps is "
                          f"{c.max_steps}; set num_train_epochs > 0 or max_steps > 0.")
    if c.bf16 and c.fp16:
        raise ConfigError("bf16 and fp16 are both true; choose one.")
    if c.eval_strategy == "steps" and c.eval_steps is None:
        c.eval_steps = c.logging_steps
    if not c.metric_for_best_model.startswith("eval_"):  # transformers' spelling: "loss" means eval_loss
        c.metric_for_best_model = f"eval_{c.metric_for_best_model}"
    if c.load_best_model_at_end and not c.eval_dataset and c.val_size == 0:
        raise ConfigError("load_best_model_at_end needs an evaluation set: set eval_dataset, or val_size (e.g. 0.1).")
    if c.load_best_model_at_end and c.eval_strategy == "no":
        raise ConfigError("load_best_model_at_end needs evaluation during training: set eval_strategy: steps or epoch.")
    if c.do_train is None:
        c.do_train = bool(c.dataset)
    if c.do_train and not c.dataset:
        raise ConfigError("do_train needs a dataset: set dataset to names from dataset_dir/dataset_info.json "
                          "(e.g. dataset: identity,alpaca_en_demo), or do_train: false.")


_HINTS = typing.get_type_hints(TrainConfig)
