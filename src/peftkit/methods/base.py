"""The Method interface, the method registry, adapter layers and target-module matching.

Everything outside `methods/` knows a method only through `Method` and `AdapterLayer`: it never branches on a
method's name or reaches into its parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import AdapterLoadError, ConfigError, PeftkitError
from ..quantization import MERGE_REFUSAL, dequantized_weight, is_quantized_param, logical_numel, quantized_bits
from ..settings import Setting

# Per-architecture default targets, as PEFT and LLaMA-Factory users expect them.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}

ALL_LINEAR = "all-linear"
# Matches the block index of a module inside a layer stack, e.g. `model.layers.3.self_attn.q_proj` -> 3.
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")

LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclasses.dataclass
class MethodConfig:
    """Settings shared by every method; each method subclasses this with its own fields."""

    target_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    method: ClassVar[str] = ""
    # The YAML keys this method reads, each filling one field (`Setting.field`, e.g. lora_rank -> r); config.py collects
    # them into TrainConfig. `target_modules` and `modules_to_save` are TrainConfig's own keys, for every method.
    yaml_keys: ClassVar[tuple[Setting, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        """Build a config, naming the closest valid key for any unknown one."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in fields]
        if unknown:
            raise ConfigError(_unknown_key_message(unknown[0], fields, f"{cls.method} config"))
        return cls(**values)

    # --- the PEFT file format (io/peft_format.py writes and reads the files; each method declares its mapping here) ---
    # PEFT's name of this method (its `peft_type`), for methods PEFT also has; None: saved as "PEFTKIT_<METHOD>" with
    # the fields as they are, which PEFT refuses to load rather than mistaking for its own.
    peft_type: ClassVar[str | None] = None
    # Our tensor suffix -> PEFT's (the first that ends a key applies); keys not listed (biases) keep their names.
    peft_tensor_names: ClassVar[tuple[tuple[str, str], ...]] = ()
    # True: the adapter saves one tensor, under its bare name (PEFT's prompt learning: "prompt_embeddings").
    peft_bare_keys: ClassVar[bool] = False

    def to_peft(self) -> dict[str, Any]:
        """This config's fields in adapter_config.json, without the file's own (peft_type, base_model_name_or_path,
        peft_version, ...), which io adds. Default, for methods PEFT lacks: every field as it is."""
        return self.to_dict()

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> MethodConfig:
        """The config an adapter_config.json describes (`raw` without the file's own fields; `where` names the file in
        messages), raising AdapterLoadError for a setting peftkit cannot honour, so loading never silently changes
        the maths. Default: the fields as `to_peft` wrote them; a ConfigError means another peftkit wrote the file."""
        return cls.from_dict(raw)


def _unknown_key_message(key: str, valid: set[str] | list[str], where: str) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."
    return f"Unknown key '{key}' in {where}.{hint}"


class ModuleTaken(ConfigError):
    """A target module already carries another method's layer (one module carries one method)."""


class AdapterLayer(nn.Module):
    """Wraps one base module and holds any number of named adapters of one method; one of them is active.

    The base module stays at `self.base_layer`, so its parameters keep PEFT's `<module>.base_layer.<param>` names.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapters: list[str] = []

    # --- what each method's layer implements ---
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """This layer's parameters of adapter `name` (the live ones: loading copies into them), keyed by our
        internal names, with no adapter name inside."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def probe_input(self) -> torch.Tensor | None:
        """A small input for checking that merging reproduces the unmerged output (None: no check)."""
        return None

    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weights; raise if the method cannot merge."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge(self) -> None:
        raise NotImplementedError

    # --- shared behaviour ---
    @property
    def use_adapter(self) -> bool:
        """Whether forward should add the active adapter (it may be absent, disabled, or already merged in)."""
        return not self.disabled and self.active_adapter is not None and not self.merged_adapters

    def set_active(self, name: str | None) -> None:
        if self.merged_adapters:
            self.unmerge()
        self.active_adapter = name if name in self.adapter_names() else None


class LinearAdapterLayer(AdapterLayer):
    """An adapter layer on nn.Linear or GPT-2's Conv1D, which stores its weight [in, out] (`fan_in_fan_out`).

    Methods do their weight maths in [out, in] through `_base_weight` / `_set_base_weight`, whatever the layout.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = linear_features(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that inspects `layer.weight` (transformers, generation utils) still works."""
        return self.base_layer.weight

    def probe_input(self) -> torch.Tensor:
        w = self.base_layer.weight
        return torch.randn(2, 4, self.in_features, device=w.device).to(w.dtype)

    def _base_weight(self) -> torch.Tensor:
        """The base weight as [out, in] (dequantized, for a 4/8-bit base layer)."""
        w = dequantized_weight(self.base_layer)
        return w.T if self.fan_in_fan_out else w

    def _set_base_weight(self, w_out_in: torch.Tensor) -> None:
        w = self.base_layer.weight
        if is_quantized_param(w):  # TunedModel.merge_adapter refuses first; this guards direct layer use
            raise PeftkitError(MERGE_REFUSAL.format(bits=quantized_bits(self.base_layer)))
        with torch.no_grad():
            w.copy_((w_out_in.T if self.fan_in_fan_out else w_out_in).to(w.dtype))


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors inside `value` (nested tuples, lists, dicts) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


class ModulesToSave(AdapterLayer):
    """A full trainable copy of a module (e.g. a classification head) per adapter, as PEFT's `modules_to_save`.

    The copy is kept in float32 like every trainable tensor (in bf16, AdamW updates below the weights' resolution
    would be lost); it gets its inputs cast up and hands its output back in their dtype (an embedding's: its table's),
    so the half-precision model around it runs unchanged.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.copies = nn.ModuleDict()
        self.base_dtype = next((p.dtype for p in base_layer.parameters() if p.is_floating_point()), torch.float32)

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.base_layer).float()
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {f"saved.{k}": p for k, p in self.copies[name].named_parameters()}

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]

    def merge(self, name: str) -> None:
        self.base_layer.load_state_dict(self.copies[name].state_dict())
        self.merged_adapters = [name]

    def unmerge(self) -> None:
        raise NotImplementedError("A merged modules_to_save copy replaced the original module and cannot be undone.")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.use_adapter:
            return self.base_layer(*args, **kwargs)
        floats = [t.dtype for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        out = self.copies[self.active_adapter](*cast_floats(args, torch.float32), **cast_floats(kwargs, torch.float32))
        return cast_floats(out, floats[0] if floats else self.base_dtype)


def reject_adapter_keys(config: MethodConfig, instead: str,
                        keys: tuple[str, ...] = ("target_modules", "modules_to_save", "layers_to_transform",
                                                 "layers_pattern")) -> None:
    """Methods that do not wrap target modules (full, freeze, the virtual-token ones) refuse PEFT's targeting keys,
    which they would otherwise silently ignore."""
    for key in keys:
        value = getattr(config, key)
        if value not in (None, [], ""):
            raise ConfigError(f"{key} ({value!r}) does not apply to finetuning_type '{config.method}': {instead}")


# The LoRA family's shared keys (LoRA, LoRA-drop, AdaLoRA): one declaration each.
LORA_ALPHA = Setting("lora_alpha", float | None, None, "Scale of the update: lora_alpha / lora_rank (/ sqrt(lora_rank) "
                     "with rsLoRA). Empty: 2 x lora_rank, as in LLaMA-Factory.")
LORA_DROPOUT = Setting("lora_dropout", float, 0.0, "Dropout on the input of the LoRA branch, in [0, 1).")
LORA_TARGET = Setting("lora_target", str | list[str] | None, "all",
                      "Modules to adapt: all (every linear layer but the output head), names such as q_proj,v_proj, or "
                      "a regex. Empty or default: the model family's usual targets.", field="target_modules")


def check_lora_scaling(lora_alpha: float, lora_dropout: float) -> None:
    """The checks every LoRA-family config shares (LoRA, LoRA-drop, AdaLoRA): one place, one message."""
    if lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be positive, got {lora_alpha!r}.")
    if not 0 <= lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}.")


Batch = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TrainingContext:
    """What the Trainer gives a method's `prepare` hook: facts about the run and the means to run a short training of
    the method's own (LoRA-drop's selection phase) through the Trainer's own step, never the Trainer itself."""

    total_steps: int  # optimizer steps of the run
    train_size: int  # training examples
    batch_size: int  # examples per micro-batch
    accumulation: int  # micro-batches per optimizer step
    seed: int
    device: torch.device
    output_dir: Path
    resuming: bool  # the run resumes from a checkpoint
    batches: Callable[[Sequence[int]], Iterator[Batch]]  # micro-batches of these training examples, in order, on device
    loss: Callable[[nn.Module, Batch], torch.Tensor]  # the objective's summed loss of a batch
    make_optimizer: Callable[[Any], torch.optim.Optimizer]  # the run's optimizer (settings) over these parameters
    step: Callable[[torch.optim.Optimizer, Sequence[Batch]], tuple[float, int]]  # the Trainer's optimizer step


class Method:
    """One adapter of one method on one model. Subclasses implement `attach`; the rest has sensible defaults.

    Training hooks, called by the trainer for every method:
      - `prepare(context)`: runs once before the optimizer is built (LoRA-drop's selection phase).
      - `param_groups(lr)`: optimizer parameter groups (LoRA+ gives lora_B its own learning rate).
      - `loss_term()`: an extra loss added to every micro-batch's loss (AdaLoRA's orthogonality regulariser).
      - `on_step_end(step)`: runs after every optimizer step, gradients still in place (AdaLoRA's rank allocation).

    In-place methods (`in_place = True`: full, freeze) train the base model's own tensors instead of adding layers:
    they are already "merged", cannot be disabled, and only one can be on a model.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    mergeable: ClassVar[bool] = True
    in_place: ClassVar[bool] = False
    output_kind: ClassVar[str] = "adapter"  # what `save` writes, for messages: "adapter" or "model"
    writes_own_files: ClassVar[bool] = False  # True: `save` writes the result (a full model folder), not a PEFT adapter

    def __init__(self, model: nn.Module, config: MethodConfig, adapter_name: str) -> None:
        self.model = model
        self.config = config
        self.adapter_name = adapter_name

    def attach(self) -> None:
        """Insert this adapter's layers into `self.model` and mark its parameters trainable."""
        raise NotImplementedError

    # --- state ---
    def layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for path, module in self.model.named_modules():
            if isinstance(module, AdapterLayer) and self.adapter_name in module.adapter_names():
                yield path, module

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors, keyed `<module path>.<internal name>`, ready for `io.peft_format`."""
        return {f"{path}.{key}": t for path, layer in self.layers()
                for key, t in layer.adapter_state(self.adapter_name).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], label: Callable[[str], str] = str) -> None:
        """Load tensors keyed as `state_dict()` returns them; every expected key must be there with its shape.

        `label` renders a key for error messages (the file's own key name, say).
        """
        expected = self.state_dict()
        for key, tensor in expected.items():
            if key not in state:
                raise AdapterLoadError(
                    f"The adapter has no tensor '{label(key)}' that this model needs: it was saved for another base "
                    "model or with another config."
                )
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise AdapterLoadError(
                    f"Shape mismatch for '{label(key)}': the file has {tuple(state[key].shape)}, this model needs "
                    f"{tuple(tensor.shape)}. The adapter was trained on a different base model."
                )
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise AdapterLoadError(
                f"The adapter has a tensor '{label(unexpected[0])}' that this model has no place for "
                f"({len(unexpected)} such tensors): it was saved for another base model."
            )
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(state[key])

    def export_state(self) -> dict[str, torch.Tensor]:
        """The tensors the adapter file holds (internal keys): `state_dict()`, except for methods that train a
        reparameterisation of what they save (P-tuning's encoder, prefix tuning's MLP) or save only part of it
        (AdaLoRA's kept triplets)."""
        return self.state_dict()

    def adapt_loaded_state(self, state: dict[str, torch.Tensor],
                           file_config: Callable[[], MethodConfig]) -> dict[str, torch.Tensor]:
        """Fit tensors read from an adapter file to this adapter before `load_state_dict` checks them: the inverse of
        what `export_state` leaves out (AdaLoRA's pruned triplets). Keys are internal names; a file key with no
        internal name keeps the file's. `file_config()` reads the file's config. Default: the tensors as they are."""
        return state

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This adapter's trainable parameters (what the optimizer gets): exactly the parameters it saves."""
        return [(k, t) for k, t in self.state_dict().items() if isinstance(t, nn.Parameter) and t.requires_grad]

    # --- training hooks ---
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for _, p in self.trainable_parameters()], "lr": lr}]

    def prepare(self, context: TrainingContext) -> None:
        """Called once before the first step."""

    def loss_term(self) -> torch.Tensor | None:
        """An extra loss for this micro-batch (already weighted), or None."""
        return None

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step, before the gradients are cleared."""

    # --- reporting and saving ---
    def notes(self) -> list[str]:
        """Lines for the trainable-parameter report (e.g. which layers BitFit gave new biases)."""
        return []

    def save(self, directory: str | os.PathLike, base_model_name_or_path: str | None) -> None:
        """Write the method's own files (only for `writes_own_files` methods; io/peft_format.py writes the others as
        PEFT adapters, so the method files never deal with file layouts)."""
        raise NotImplementedError(f"{self.name} is saved by io.peft_format.save_method.")

    # --- attaching ---
    def wrap(self, path: str, layer_cls: type[AdapterLayer], make: Callable[[nn.Module], AdapterLayer] | None = None,
             hint: str = "") -> Any:
        """The `layer_cls` layer at `path`: the one already there (another adapter of this method shares it), or a
        new one, built by `make` (default `layer_cls`) around the module found there. Another method's layer there is
        an error: one module carries one method."""
        module = self.model.get_submodule(path)
        if isinstance(module, layer_cls):
            return module
        if isinstance(module, AdapterLayer):
            raise ModuleTaken(f"'{path}' already carries a {type(module).__name__}; {self.name} cannot wrap it "
                              f"again.{hint}")
        layer = (make or layer_cls)(module)
        layer.train(module.training)  # a layer added to a model in eval mode is in eval mode (no dropout)
        replace_module(self.model, path, layer)
        return layer

    # --- modules_to_save, shared by every method ---
    def attach_modules_to_save(self) -> None:
        for name in self.config.modules_to_save or []:
            paths = [p for p, _ in self.model.named_modules() if p == name or p.endswith(f".{name}")]
            if not paths:
                raise ConfigError(
                    f"modules_to_save '{name}' matches no module. "
                    f"Candidates: {', '.join(top_level_modules(self.model))}."
                )
            for path in paths:
                module = self.model.get_submodule(path)
                if not isinstance(module, ModulesToSave):
                    module = ModulesToSave(module)
                    replace_module(self.model, path, module)
                module.add(self.adapter_name)
                module.set_active(self.adapter_name)


# --- registry ---
_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, sorted(_REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown method '{name}'.{hint} Available methods: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def method_for_config(config: MethodConfig) -> type[Method]:
    return get_method(config.method)


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_keys() -> dict[str, list[str]]:
    """Every method-specific YAML key -> the methods whose config reads it (for "that key is not for this method")."""
    keys: dict[str, list[str]] = {}
    for name, cls in sorted(_REGISTRY.items()):
        for s in cls.config_class.yaml_keys:
            keys.setdefault(s.name, []).append(name)
    return keys


# --- target-module matching ---
def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = _LAYER_INDEX.match(path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match.group("idx")) if match else None


def candidate_modules(model: nn.Module, types: tuple[type, ...] = (*LINEAR_TYPES, nn.Embedding)) -> list[str]:
    """Distinct short names of the modules a method could target, for error messages."""
    names = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, types) and path}
    return sorted(names)


def top_level_modules(model: nn.Module) -> list[str]:
    return sorted({path.rsplit(".", 1)[-1] for path, _ in model.named_modules() if path and not path[-1].isdigit()})


def find_targets(
    model: nn.Module,
    target_modules: list[str] | str | None,
    *,
    layers_to_transform: list[int] | int | None = None,
    layers_pattern: list[str] | str | None = None,
    types: tuple[type, ...] = (*LINEAR_TYPES, nn.Embedding),
    exclude: list[str] | None = None,
) -> list[str]:
    """Paths of the modules to adapt.

    `target_modules` is a list of names (a module matches if its path equals a name or ends with `.name`), a regex
    (full match on the path), `all-linear` (every linear layer but the output head), or None for the architecture's
    default. Raises ConfigError, listing the model's candidate names, when nothing matches.
    """
    if target_modules is None:
        model_type = _model_type(model)
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(
                f"No default target modules for model type '{model_type}'; set target_modules (lora_target) to some "
                f"of: {', '.join(candidate_modules(model, types))}, or 'all-linear'."
            )
        target_modules = DEFAULT_TARGETS[model_type]
    if isinstance(target_modules, str) and "," in target_modules and target_modules != ALL_LINEAR:
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    if isinstance(target_modules, list) and target_modules == [ALL_LINEAR]:
        target_modules = ALL_LINEAR

    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = set(exclude or [])
    adapted = {p for p, m in model.named_modules() if isinstance(m, AdapterLayer)}
    found = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(f"{a}.") for a in adapted):
            continue  # the internals of an adapter layer: the layer itself stands for its base module
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        if not isinstance(base, types):
            continue
        if any(path == e or path.endswith(f".{e}") or f".{e}." in f".{path}." for e in excluded):
            continue
        if target_modules == ALL_LINEAR:
            hit = isinstance(base, LINEAR_TYPES) and base is not output_head
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, path) is not None
        else:
            hit = any(path == t or path.endswith(f".{t}") for t in target_modules)
        if hit and layers_to_transform is not None:
            wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
            hit = _layer_index(path, layers_pattern) in wanted
        if hit:
            found.append(path)
    if not found:
        where = f" in layers {layers_to_transform}" if layers_to_transform is not None else ""
        raise ConfigError(
            f"target_modules {target_modules!r} matched no module{where}. "
            f"This model's candidate modules are: {', '.join(candidate_modules(model, types))}."
        )
    return found


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of nn.Linear, a bitsandbytes linear (packed weight) or GPT-2's Conv1D (weight [in, out])."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a 4-bit weight counts the parameters it stands for, not its bytes."""
    trainable = total = 0
    for p in model.parameters():
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """The trainable-parameter line in PEFT's wording, so logs compare one to one."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
