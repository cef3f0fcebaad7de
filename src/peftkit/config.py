"""One YAML file plus `key=value` overrides -> one typed, validated `TrainConfig`, before any model is loaded.

Training keys are Hugging Face `TrainingArguments` names; model, data and method keys are LLaMA-Factory's, so its
example YAML files load unchanged. Every check and its error message lives here, so a run never fails an hour in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from .data.mixing import MIX_STRATEGIES, check_mixing
from .errors import ConfigError
from .methods import MethodConfig, available_methods, get_method
from .objectives import available_objectives, objective_class
from .objectives.dpo import REFERENCE_FREE
from .quantization import QuantizationConfig
from .settings import Setting, merge_declarations, setting, settings_of

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
EVAL_STRATEGIES = ("no", "steps", "epoch")
OPTIMS = ("adamw_torch_fused", "adamw_torch")  # transformers' names of torch.optim.AdamW, fused or not
SAVE_STRATEGIES = ("steps", "epoch", "no")
BENCHMARK_LANGS = ("en", "zh")
STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto")  # LLaMA-Factory's
INFER_DTYPES = ("auto", "float32", "float16", "bfloat16")
EXPORT_FORMATS = ("hf", "gguf", "ollama", "gguf_lora")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # export/gguf.py maps them onto ggml types
EXPORT_DEVICES = ("cpu", "auto")  # LLaMA-Factory's: where the merge runs
# transformers' `fsdp` words; sharding is per decoder layer whichever is given
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "offload", "auto_wrap")

_NOT_HERE = "FSDP shards each decoder layer (fsdp: full_shard); its finer settings are not read"
_NO_MEDIA = "text-only models for now; multimodal settings have no effect"
_NO_HUB = "uploading is not supported (no network); push the output_dir yourself"
_NO_GPTQ = "GPTQ export is not supported; export_format: gguf with export_gguf_type: q4_0 or q8_0 quantizes instead"
# Keys from LLaMA-Factory configs that are accepted so its files load, with a warning saying why they do nothing.
IGNORED_KEYS: dict[str, str] = {
    "fsdp_config": _NOT_HERE, "ray_run_name": "Ray is not used: launch with torchrun or accelerate",
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
    "torch_compile_backend": "torch_compile uses inductor",
    "torch_compile_mode": "torch_compile uses inductor's default mode",
    "image_max_pixels": _NO_MEDIA, "video_max_pixels": _NO_MEDIA, "freeze_vision_tower": _NO_MEDIA,
    "media_dir": _NO_MEDIA,
    "export_quantization_nsamples": _NO_GPTQ, "export_quantization_maxlen": _NO_GPTQ,
    "predict_with_generate": "predict always generates", "run_name": "runs are named by output_dir",
    "logging_dir": "logs go to output_dir/trainer_log.jsonl",
    "ref_model_quantization_bit": "a separate reference model loads in the training dtype",
    "pref_bco_weight": "BCO is not implemented", "ld_alpha": "LD-DPO is not implemented",
    "use_ref_model": "whether a reference is used follows pref_loss (orpo and simpo use none)",
}
_ALIASES = {"evaluation_strategy": "eval_strategy"}  # old TrainingArguments name -> current
# LLaMA-Factory's evaluation YAML (llamafactory-cli eval) names two keys its own way: read as ours, without a warning.
_SYNONYMS = {"save_dir": "output_dir", "batch_size": "per_device_eval_batch_size"}


def _collect(owners: list[tuple[str, type]]) -> dict[str, tuple[Setting, list[str]]]:
    """The YAML keys that registered methods or objectives declare (`yaml_keys`): name -> (setting, their owners)."""
    return merge_declarations([(name, s) for name, cls in owners for s in cls.yaml_keys])


# Methods' and objectives' own keys live in their config classes; TrainConfig gets them from there, so a new method
# or stage adds its keys in its own file. Collected once, at import (every built-in registers on import).
METHOD_SETTINGS = _collect([(n, get_method(n).config_class) for n in available_methods()])
STAGE_SETTINGS = _collect([(n, objective_class(n)) for n in available_objectives()])
_OwnKeys = dataclasses.make_dataclass(
    "MethodAndStageKeys",
    [(s.name, s.type, s.as_field()) for s, _ in (*METHOD_SETTINGS.values(), *STAGE_SETTINGS.values())],
)


@dataclasses.dataclass
class TrainConfig(_OwnKeys):  # type: ignore[valid-type,misc]
    """Every setting of a run, flat as in LLaMA-Factory's YAML; built by `load_config`, validated on creation.

    Each field's `setting(default, help, group)` is what the YAML loader, `peftkit webui` and the docs show; the
    methods' and stages' keys come from their config classes (`_OwnKeys`)."""

    # --- model ---
    model_name_or_path: str | None = setting(None, "A model alias (smollm2-135m), a local folder or a hub id.", "model")
    adapter_name_or_path: str | None = setting(None, "An adapter folder to continue training, or to export.", "model")
    trust_remote_code: bool = setting(False, "Run the model's own Python code from its folder or hub repo.", "model")
    quantization_bit: int | None = setting(
        None, "Load the base model's linear layers in 4 bits (QLoRA) or 8 bits (LLM.int8).", "model")
    quantization_type: str = setting("nf4", "The 4-bit data type: nf4 or fp4.", "model")
    double_quantization: bool = setting(
        True, "4-bit: quantize the quantization constants too (about 0.37 bits per parameter saved).", "model")
    quantization_method: str = setting("bnb", "The quantization backend: bnb (bitsandbytes), the only one.", "model")
    # --- method and stage ---
    stage: str = setting("sft", "The training objective: sft (supervised fine-tuning), or another stage.", "method")
    finetuning_type: str = setting("lora", "The method: a name from peftkit.available_methods().", "method")
    target_modules: str | list[str] | None = setting(
        None, "PEFT's name for the modules to adapt, for any method. Empty: the method's own default.", "method")
    additional_target: list[str] | None = setting(
        None, "Modules trained in full and saved with the adapter (PEFT's modules_to_save), e.g. lm_head.", "method")
    # --- data ---
    dataset: list[str] | None = setting(
        None, "Names in dataset_dir/dataset_info.json, e.g. identity,alpaca_en_demo.", "data")
    eval_dataset: list[str] | None = setting(None, "Names of datasets to evaluate on.", "data")
    dataset_dir: str = setting("data", "The folder holding dataset_info.json and the data files.", "data")
    template: str | None = setting(
        None, "The chat template by LLaMA-Factory's name (qwen, llama3, ...). Empty: the tokenizer's own.", "data")
    cutoff_len: int = setting(2048, "Longest example in tokens; longer ones are cut.", "data")
    max_samples: int | None = setting(None, "Use at most this many rows of each dataset.", "data")
    val_size: int | float = setting(
        0.0, "Hold out this share (in [0, 1)) or count (>= 1) of each dataset for evaluation.", "data")
    mix_strategy: str = setting(
        "concat", "How several datasets combine: concat (all rows of each), interleave_under (drawn by "
        "interleave_probs until one runs out) or interleave_over (until each has run out once; the others repeat).",
        "data", MIX_STRATEGIES)
    interleave_probs: list[float] | None = setting(
        None, "interleave_*: the chance of drawing from each dataset, one per dataset, summing to 1. Empty: take "
        "them in turn.", "data")
    packing: bool | None = setting(
        None, "Pack several examples into one row; they never attend to each other. Empty: on for stage pt (its "
        "documents are joined and cut into cutoff_len blocks), off otherwise.", "data")
    padding_free: bool = setting(
        True, "Run a micro-batch as one unpadded row with per-example attention.", "data")
    train_on_prompt: bool = setting(False, "Train on the prompt tokens too, not only the answers.", "data")
    mask_history: bool = setting(False, "Train only on the last answer of a conversation.", "data")
    enable_thinking: bool = setting(
        True, "Reasoning templates (qwen3, deepseekr1): train the think block; false drops it.", "data")
    overwrite_cache: bool = setting(False, "Tokenize the data again instead of reading the cache.", "data")
    preprocessing_num_workers: int | None = setting(
        None, "Accepted for LLaMA-Factory's files; tokenization runs in this process.", "data")
    dataloader_num_workers: int = setting(
        0, "Accepted for LLaMA-Factory's files; batches are built in the training process.", "data")
    # --- training (TrainingArguments) ---
    do_train: bool | None = setting(None, "Train. Empty: true when dataset is set.", "basic")
    learning_rate: float = setting(5e-5, "The peak learning rate of AdamW.", "basic")
    num_train_epochs: float = setting(3.0, "Passes over the training data.", "basic")
    max_steps: int = setting(-1, "Optimizer steps to train; > 0 overrides num_train_epochs.", "basic")
    per_device_train_batch_size: int = setting(1, "Examples per micro-batch.", "basic")
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step.", "basic")
    lr_scheduler_type: str = setting("linear", "How the learning rate changes over training.", "basic",
                                     LR_SCHEDULERS)
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this; 0 disables clipping.", "basic")
    warmup_ratio: float = setting(0.0, "Share of the steps that warm the learning rate up from 0.", "basic")
    warmup_steps: int = setting(0, "Warm-up steps; > 0 overrides warmup_ratio.", "basic")
    bf16: bool | None = setting(None, "Train in bfloat16. Empty: where the device computes it fast.", "basic")
    fp16: bool = setting(False, "Train in float16 (GPUs without bfloat16).", "basic")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay.", "extra")
    adam_beta1: float = setting(0.9, "AdamW's beta1.", "extra")
    adam_beta2: float = setting(0.999, "AdamW's beta2.", "extra")
    adam_epsilon: float = setting(1e-8, "AdamW's epsilon.", "extra")
    optim: str = setting(OPTIMS[0], "AdamW's implementation: adamw_torch_fused (one fused kernel, "
                         "transformers' default) or adamw_torch (a loop over the tensors); others fall back to the "
                         "first.", "extra")
    lr_scheduler_kwargs: dict[str, Any] = setting({}, "Extra arguments of the schedule, e.g. {num_cycles: 2}.",
                                                  "extra")
    logging_steps: int = setting(10, "Log the loss every N steps.", "extra")
    seed: int = setting(42, "Seed of initialisation, shuffling and dropout.", "extra")
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in the backward pass: less memory, about 30% slower.", "extra")
    torch_compile: bool = setting(
        False, "Compile the decoder layers with torch.compile for training steps (the first step waits for it; "
        "cached across runs). On 2 CPU cores no faster than the default kernels.", "extra")
    report_to: str | list[str] = setting(
        "none", "Only none: metrics go to output_dir/trainer_log.jsonl.", "extra")
    plot_loss: bool = setting(False, "Save the loss curve as output_dir/training_loss.png.", "extra")
    do_eval: bool = setting(False, "Evaluate (peftkit eval, or after training).", "evaluation")
    do_predict: bool = setting(False, "Generate answers for the dataset (peftkit predict).", "evaluation")
    per_device_eval_batch_size: int = setting(1, "Examples per evaluation batch.", "evaluation")
    eval_strategy: str = setting("no", "When to evaluate during training.", "evaluation", EVAL_STRATEGIES)
    eval_steps: int | None = setting(None, "Evaluate every N steps. Empty: logging_steps.", "evaluation")
    load_best_model_at_end: bool = setting(
        False, "Keep the checkpoint with the best metric_for_best_model, not the last.", "evaluation")
    metric_for_best_model: str = setting(
        "eval_loss", "The evaluation metric load_best_model_at_end compares (loss = eval_loss).", "evaluation")
    greater_is_better: bool | None = setting(
        None, "Empty: lower is better for a metric ending in loss, higher otherwise.", "evaluation")
    task: str | None = setting(
        None, "peftkit eval's multiple-choice benchmark: mmlu, cmmlu or ceval (LLaMA-Factory's mmlu_test, "
        "cmmlu_test, ceval_validation name the split too).", "benchmark")
    task_dir: str = setting("evaluation", "The folder holding the benchmark's per-subject files.", "benchmark")
    n_shot: int = setting(5, "Solved examples from the subject's dev split shown before each question.",
                          "benchmark")
    lang: str = setting("en", "The language of the benchmark's prompt: en or zh.", "benchmark", BENCHMARK_LANGS)
    output_dir: str = setting("saves/run", "Where the adapter, checkpoints and logs go.", "output")
    overwrite_output_dir: bool = setting(False, "Replace an earlier run in output_dir.", "output")
    save_strategy: str = setting("steps", "When to save checkpoints.", "output", SAVE_STRATEGIES)
    save_steps: int = setting(500, "Save a checkpoint every N steps.", "output")
    save_total_limit: int | None = setting(None, "Keep only the newest N checkpoints.", "output")
    save_only_model: bool = setting(
        False, "Checkpoints hold only the adapter: smaller, but training cannot resume from them.", "output")
    resume_from_checkpoint: str | bool | None = setting(
        None, "A checkpoint folder, or true for the newest one in output_dir.", "output")
    resume_allow_changes: bool = setting(
        False, "Resume even though settings that change the result differ from the checkpoint's.", "output")
    # --- several processes (torchrun, accelerate launch, peftkit train --nproc-per-node) ---
    fsdp: str | list[str] | None = setting(
        None, "Shard parameters, gradients and optimizer state over the processes: full_shard. Empty: DDP.",
        "distributed")
    deepspeed: str | None = setting(
        None, "A DeepSpeed JSON config (ZeRO stage 0-3); needs a GPU. On a CPU, use fsdp: full_shard.", "distributed")
    ddp_timeout: int = setting(1800, "Seconds a process waits for the others before the run fails.", "distributed")
    ddp_find_unused_parameters: bool | None = setting(
        None, "DDP: allow trainable parameters a step does not use (slower). Empty: false.", "distributed")
    # --- generation and export ---
    max_new_tokens: int = setting(512, "Longest answer in tokens.", "generation")
    temperature: float | None = setting(None, "Sampling temperature. Empty: the model's default.", "generation")
    top_p: float | None = setting(None, "Nucleus sampling: keep the most likely tokens up to this mass.", "generation")
    top_k: int | None = setting(None, "Sample among the k most likely tokens.", "generation")
    repetition_penalty: float | None = setting(None, "Above 1 makes repeated tokens less likely.", "generation")
    do_sample: bool = setting(False, "Sample; false: greedy decoding.", "generation")
    infer_dtype: str = setting("auto", "The inference dtype.", "generation", INFER_DTYPES)
    export_dir: str | None = setting(None, "Where peftkit export writes.", "export")
    export_size: int = setting(5, "Shard size of an exported HF model, in GB.", "export")
    export_format: str = setting(
        "hf", "hf folder, gguf file, ollama (gguf + Modelfile), or gguf_lora (llama.cpp LoRA adapter).", "export",
        EXPORT_FORMATS)
    export_gguf_type: str = setting("f16", "The GGUF's weight type (norms stay f32).", "export", GGUF_TYPES)
    ollama_system: str | None = setting(
        None, "A SYSTEM line for the Modelfile. Empty: the template's default system prompt.", "export")
    export_device: str = setting(
        "cpu", "Where the merge runs: cpu, or auto (the GPU when there is one).", "export", EXPORT_DEVICES)
    export_legacy_format: bool = setting(
        False, "hf: also write PyTorch .bin weights beside the safetensors, for older tools.", "export")
    export_quantization_bit: int | None = setting(
        None, "LLaMA-Factory's GPTQ export: refused; export_format gguf with q4_0 or q8_0 quantizes.", "export")
    export_quantization_dataset: str | None = setting(
        None, "GPTQ calibration data: refused with export_quantization_bit.", "export")
    export_hub_model_id: str | None = setting(
        None, "Upload after export: refused (no network); upload export_dir yourself.", "export")

    def __post_init__(self) -> None:
        _validate(self)
        self._check_method_keys()

    def quantization(self) -> QuantizationConfig | None:
        """The base model's quantization, or None for a full-precision base."""
        if self.quantization_bit is None:
            return None
        return QuantizationConfig(self.quantization_bit, self.quantization_type, self.double_quantization)

    def method_config(self) -> MethodConfig:
        """The `finetuning_type` method's config, from the keys its config class declares (`yaml_keys`)."""
        cls = get_method(self.finetuning_type).config_class
        values = {s.target: getattr(self, s.name) for s in cls.yaml_keys}
        names = {f.name for f in dataclasses.fields(cls)}
        if "lora_alpha" in values and values["lora_alpha"] is None:
            values["lora_alpha"] = 2 * self.lora_rank  # LLaMA-Factory's default
        if "target_modules" in names:
            target = self.target_modules
            if target is None and "lora_target" in METHOD_SETTINGS and self.finetuning_type in METHOD_SETTINGS[
                    "lora_target"][1]:
                target = self.lora_target
            values["target_modules"] = _targets(target)
        if "modules_to_save" in names:
            values["modules_to_save"] = self.additional_target or None
        if "tokenizer_name_or_path" in names:  # prompt tuning's text init tokenizes with the model's tokenizer
            values["tokenizer_name_or_path"] = self.model_name_or_path
        return cls(**values)

    def _check_method_keys(self) -> None:
        """Build the method config now, so impossible values fail before any work; warn about keys set for another
        method (e.g. `lora_rank` with `finetuning_type: ia3`), which would otherwise be silently ignored. The same for
        a stage's keys."""
        self.method_config()
        for kind, chosen, declared in (("finetuning_type", self.finetuning_type, METHOD_SETTINGS),
                                       ("stage", self.stage, STAGE_SETTINGS)):
            for key, (s, owners) in declared.items():
                if chosen not in owners and getattr(self, key) != s.default:
                    warnings.warn(f"{key} is a setting of {', '.join(owners)}, not of {kind} '{chosen}': it is "
                                  "ignored.", UserWarning, stacklevel=4)

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


def read_deepspeed(path: str) -> dict[str, Any]:
    """A DeepSpeed JSON config (LLaMA-Factory's ds_z0/z2/z3 files), its ZeRO stage checked to be 0 to 3."""
    p = Path(path).expanduser()
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"deepspeed: cannot read '{p}' ({e.strerror}); give the path of a DeepSpeed JSON config, "
                          "e.g. examples/deepspeed/ds_z3_config.json.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: '{p}' is not valid JSON ({e}).") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: '{p}' has zero_optimization.stage {stage!r}; DeepSpeed's ZeRO stages are 0, 1, "
                          "2 and 3.")
    return config


def deepspeed_stage(path: str) -> int:
    """The ZeRO stage of a DeepSpeed JSON config."""
    return read_deepspeed(path).get("zero_optimization", {}).get("stage", 0)


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


# What a phase of a recipe may not set: where it writes and what it starts from follow from the recipe, and the
# method (and its base weights' precision) continues from one phase to the next.
_RECIPE_OWNED = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "model_name_or_path",
                 "adapter_name_or_path", "finetuning_type", "quantization_bit", "quantization_type",
                 "double_quantization")


@dataclasses.dataclass
class Recipe:
    """Phases trained one after another, each from the previous one's weights, into output_dir/phase-N; the last
    phase's result is also copied to output_dir. `resume` continues a stopped recipe at its phase and step."""

    output_dir: str
    phases: list[TrainConfig]
    resume: bool = False
    overwrite: bool = False


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (), **kw: Any) -> TrainConfig | Recipe:
    """`load_config`, or a `Recipe` when the YAML has `phases:`, a list of overrides of its shared keys.

    A phase's keys win over the shared ones and the command line's `key=value` win over both, in every phase (so
    `max_steps=2` shortens each phase). A phase's config is validated here, before the first phase trains."""
    values = _rename_aliases(_read_yaml(path)) if path else {}
    given = {**_rename_aliases(parse_overrides(overrides)), **_rename_aliases(kw)}
    if "phases" in given:
        raise ConfigError("phases can only be set in the YAML file (a list of mappings), not as key=value.")
    phases = values.pop("phases", None)
    if phases is None:
        return TrainConfig.from_dict({**values, **given})
    if not isinstance(phases, list) or not phases or not all(isinstance(p, dict) for p in phases):
        raise ConfigError("phases must be a non-empty list of mappings, each the keys that phase changes, e.g.\n"
                          "phases:\n  - {dataset: math}\n  - {dataset: alpaca_en_demo, learning_rate: 5e-5}")
    shared = {**values, **given}
    resume = shared.pop("resume_from_checkpoint", None)
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    if resume not in (None, False, True):
        raise ConfigError(f"resume_from_checkpoint: {resume!r} names one checkpoint, but a recipe resumes where it "
                          "stopped, whichever phase that is: set resume_from_checkpoint: true.")
    overwrite = _coerce("overwrite_output_dir", shared.pop("overwrite_output_dir", False), bool)
    output_dir = str(shared.pop("output_dir", TrainConfig.__dataclass_fields__["output_dir"].default))
    fixed = set(_RECIPE_OWNED) | set(METHOD_SETTINGS)
    recipe = Recipe(output_dir, [], bool(resume), bool(overwrite))
    for i, phase in enumerate(phases, 1):
        phase = _rename_aliases(phase)
        owned = sorted(k for k in phase if k in fixed or k == "phases")
        if owned:
            raise ConfigError(f"phases[{i}] sets {', '.join(owned)}, which the whole recipe shares (the weights and "
                              "method carry on from phase to phase, and each phase writes to output_dir/phase-N); "
                              "set it at the top of the file.")
        values_i = {**values, **phase, **given, "output_dir": str(Path(output_dir) / f"phase-{i}")}
        values_i.pop("resume_from_checkpoint", None)
        values_i.pop("overwrite_output_dir", None)
        try:
            recipe.phases.append(TrainConfig.from_dict(values_i))
        except ConfigError as e:
            raise ConfigError(f"phases[{i}]: {e}") from None
    return recipe


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
    for theirs, ours in _SYNONYMS.items():
        if theirs in values:
            if ours in values:
                raise ConfigError(f"Both {theirs} and {ours} are set; keep one ({theirs} is LLaMA-Factory's "
                                  f"evaluation name of {ours}).")
            values[ours] = values.pop(theirs)
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
    if kind is list and isinstance(value, (int, float)):  # `interleave_probs: 1` or `dataset: 2024`: a list of one
        return [str(value)]
    if kind is list and isinstance(value, (list, tuple)) and all(type(v) in (str, int, float) for v in value):
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
        "logging_steps", "save_steps", "eval_steps", "save_total_limit", "max_samples", "export_size",
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
    ("n_shot", lambda v: v >= 0, "at least 0"),
    ("val_size", lambda v: 0 <= v < 1 or (v >= 1 and float(v).is_integer()), "a fraction in [0, 1) or a count >= 1"),
]


def _check_choice(key: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), list(options), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key} '{value}' is not one of: {', '.join(options)}.{hint}")


def _check_stage(c: TrainConfig) -> None:
    """Combinations of a stage with other keys that cannot work, refused before any work; the stage's defaults."""
    for s, _ in STAGE_SETTINGS.values():
        if s.choices:
            _check_choice(s.name, getattr(c, s.name), s.choices)
    objective = objective_class(c.stage)
    data = objective.data
    if c.packing is None:
        c.packing = data == "text"  # LLaMA-Factory packs pretraining text by default
    objective.check_config(c)
    if c.packing and data in ("pairs", "kto", "prompts"):
        raise ConfigError(f"packing: true cannot be used with stage '{c.stage}': its examples are compared with each "
                          "other, not trained one by one. Set packing: false.")
    uses_reference = c.stage == "kto" or (c.stage == "dpo" and c.pref_loss not in REFERENCE_FREE)
    if (c.ref_model or c.ref_model_adapters) and not uses_reference:
        why = (f"pref_loss: {c.pref_loss} is reference-free" if c.stage == "dpo"
               else f"stage '{c.stage}' has no reference model")
        raise ConfigError(f"ref_model / ref_model_adapters are set, but {why}; remove them (or use stage: dpo with a "
                          "pref_loss that compares with a reference, or stage: kto).")
    if c.ref_model_adapters and not c.ref_model:
        raise ConfigError("ref_model_adapters needs ref_model: the base model the reference adapter goes on.")
    if c.stage in ("dpo", "kto") and c.pref_beta <= 0:
        raise ConfigError(f"pref_beta must be greater than 0, got {c.pref_beta}.")
    if c.stage == "kto" and min(c.per_device_train_batch_size, c.per_device_eval_batch_size) < 2:
        warnings.warn("stage kto estimates its reference point (the KL term) from the mismatched pairs of each "
                      "micro-batch, as TRL does; with a batch of 1 that is a single pair, clamped at 0, a noisy and "
                      "upward-biased estimate. Use per_device_train_batch_size and per_device_eval_batch_size >= 2.",
                      UserWarning, stacklevel=3)
    if c.stage == "kd":
        if not c.teacher_model_name_or_path and c.shrink_target_layers is None:
            raise ConfigError("stage kd needs teacher_model_name_or_path: the model the student learns to imitate.")
        if c.shrink_target_layers is not None:
            if c.shrink_target_layers < 1:
                raise ConfigError(f"shrink_target_layers must be at least 1, got {c.shrink_target_layers}.")
            if c.finetuning_type not in ("full", "lora"):
                raise ConfigError(f"Progressive shrinking trains with finetuning_type full or lora, not "
                                  f"'{c.finetuning_type}'.")
            if c.quantization_bit:
                raise ConfigError("Progressive shrinking saves the smaller model with its adapter merged, which a "
                                  "quantized model cannot take: remove quantization_bit.")
            if c.load_best_model_at_end:
                raise ConfigError("load_best_model_at_end cannot be used with progressive shrinking: the earlier "
                                  "evaluations scored a model with more layers.")
        for key, ok, must in (("kd_temperature", c.kd_temperature > 0, "greater than 0"),
                              ("kd_alpha", 0 <= c.kd_alpha <= 1, "in [0, 1]"),
                              ("kd_jsd_beta", 0 < c.kd_jsd_beta < 1, "in (0, 1)"),
                              ("kd_top_k", c.kd_top_k >= 0, "0 (the whole vocabulary) or a number of tokens")):
            if not ok:
                raise ConfigError(f"{key} must be {must}, got {getattr(c, key)!r}.")
        if c.kd_cache_teacher and not c.kd_top_k:
            raise ConfigError("kd_cache_teacher stores the teacher's top-k log-probs: set kd_top_k too (for example "
                              "64; the whole vocabulary would cost 2 bytes per token per position).")
        if c.teacher_quantization_bit not in (None, 4, 8):
            raise ConfigError(f"teacher_quantization_bit must be 4 or 8, got {c.teacher_quantization_bit!r}.")
    if not 0 <= c.dpo_label_smoothing < 0.5:
        raise ConfigError(f"dpo_label_smoothing must be in [0, 0.5), got {c.dpo_label_smoothing}.")


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

    if c.stage not in available_objectives():
        verb = "is not supported yet" if c.stage in STAGES else "is unknown"
        raise ConfigError(f"stage '{c.stage}' {verb}: LLaMA-Factory's stages are {', '.join(STAGES)}; "
                          f"supported here: {', '.join(available_objectives())}.")
    _check_stage(c)
    _check_choice("finetuning_type", c.finetuning_type, available_methods())
    for s in RUN_SETTINGS:  # the methods' own choices are checked by their config classes, with their messages
        if s.choices:
            _check_choice(s.name, getattr(c, s.name), s.choices)
    c.interleave_probs = check_mixing(c.mix_strategy, c.interleave_probs, c.dataset)
    if c.optim not in OPTIMS:
        warnings.warn(f"optim '{c.optim}' is not supported; using {OPTIMS[0]} (torch.optim.AdamW, fused).",
                      stacklevel=2)
        c.optim = OPTIMS[0]
    reporters = [c.report_to] if isinstance(c.report_to, str) else c.report_to
    if any(r != "none" for r in reporters):
        warnings.warn(f"report_to={c.report_to!r} is not supported; metrics go to output_dir/trainer_log.jsonl "
                      "(set plot_loss: true for a loss plot).", stacklevel=2)

    if c.quantization_method not in ("bnb", "bitsandbytes"):
        raise ConfigError(f"quantization_method '{c.quantization_method}' is not supported; use bnb (bitsandbytes).")
    if c.quantization() is not None:
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
    fsdp = c.fsdp.split() if isinstance(c.fsdp, str) else list(c.fsdp or [])
    unknown = [w for w in fsdp if w not in FSDP_OPTIONS]
    if unknown:
        raise ConfigError(f"fsdp '{' '.join(unknown)}' is not one of: {', '.join(FSDP_OPTIONS)} (e.g. fsdp: "
                          "full_shard).")
    if c.deepspeed and fsdp:
        raise ConfigError("deepspeed and fsdp are both set; choose one engine.")
    if c.deepspeed:
        deepspeed_stage(c.deepspeed)
    if c.bf16 and c.fp16:
        raise ConfigError("bf16 and fp16 are both true; choose one.")
    if c.torch_compile and c.gradient_checkpointing:
        warnings.warn("torch_compile has no effect with gradient_checkpointing: torch's checkpoint runs the decoder "
                      "layers uncompiled. Drop one of them.", UserWarning, stacklevel=2)
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
# TrainConfig's own keys (not a method's or a stage's), as declared by its fields.
RUN_SETTINGS: list[Setting] = [s for s in settings_of(TrainConfig, _HINTS)
                               if s.name not in METHOD_SETTINGS and s.name not in STAGE_SETTINGS]
