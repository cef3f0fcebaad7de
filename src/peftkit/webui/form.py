"""The web UI's forms, built from the config schema: one field per YAML key, and form values <-> a YAML document.

Nothing here knows gradio. A field is a `Setting` (its type, default, help, group, choices) plus who reads it (a
method, a stage, or every run), so a new method, stage or key reaches the UI with no UI code. What the forms produce is
a YAML file that `peftkit train` reads: the UI runs exactly what the command line runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..config import METHOD_SETTINGS, RUN_SETTINGS, STAGE_SETTINGS, TrainConfig
from ..data.sources import load_registry, split_names
from ..errors import ConfigError, PeftkitError
from ..models import BUILTIN_MODELS
from ..settings import Setting
from ..train.checkpoint import check_output_dir

# The keys the Train tab shows above its groups, in this order (LLaMA-Factory's top rows).
TOP_KEYS = ("model_name_or_path", "finetuning_type", "adapter_name_or_path", "stage", "dataset_dir", "dataset",
            "template", "output_dir")
# The Train tab's accordions, in LLaMA-Factory's order; the other groups belong to the other tabs.
TRAIN_GROUPS = ("basic", "data", "extra", "method", "rlhf", "evaluation", "output", "model", "distributed")
TRAIN_COMMAND = "train"
CONFIG_NAME = "training_args.yaml"  # the YAML the UI writes into a run's output_dir (LLaMA-Factory's name)
PROCESS_LOG_NAME = "running_log.txt"  # the training process's console output, beside it


@dataclasses.dataclass(frozen=True)
class Field:
    """One key of the form: its setting, and the methods or stages that read it (empty: every run)."""

    setting: Setting
    scope: str  # "run", "method" or "stage"
    owners: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.setting.name

    @property
    def kind(self) -> str:
        """The widget: checkbox, tristate (true/false/auto), choice, number, optional_number or text.

        A number that may be null is a text box: gradio's Number shows null as 0 and sends 0 back (max_samples: 0,
        lora_alpha: 0) once it is drawn."""
        kinds = _kinds(self.setting.type)
        if kinds == {bool}:
            return "checkbox"
        if kinds == {bool, type(None)}:
            return "tristate"
        if self.setting.choices:
            return "choice"
        if kinds - {type(None)} <= {int, float}:
            return "optional_number" if type(None) in kinds else "number"
        return "text"


def _kinds(tp: Any) -> set[type]:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return {typing.get_origin(a) or a for a in (typing.get_args(tp) if union else (tp,))}


def fields() -> list[Field]:
    """Every key, in declaration order: the run's own, then each method's, then each stage's."""
    return [*(Field(s, "run") for s in RUN_SETTINGS),
            *(Field(s, "method", tuple(owners)) for s, owners in METHOD_SETTINGS.values()),
            *(Field(s, "stage", tuple(owners)) for s, owners in STAGE_SETTINGS.values())]


def fields_by_name() -> dict[str, Field]:
    return {f.name: f for f in fields()}


def group_fields(group: str) -> list[Field]:
    """The fields of one accordion; the method group holds every method's keys (the UI shows the chosen one's)."""
    if group == "method":
        return [f for f in fields() if f.scope == "method" or (f.setting.group == "method" and f.name not in TOP_KEYS)]
    if group == "rlhf":
        return [f for f in fields() if f.scope == "stage" or (f.setting.group == "rlhf" and f.scope == "run")]
    return [f for f in fields() if f.scope == "run" and f.setting.group == group and f.name not in TOP_KEYS]


def visible(field: Field, method: str, stage: str) -> bool:
    """A method's key shows only for that method, a stage's only for that stage."""
    chosen = {"method": method, "stage": stage}.get(field.scope)
    return chosen is None or chosen in field.owners


# --- values: YAML <-> widgets ---
TRISTATE = ("auto", "true", "false")


def shown(field: Field, value: Any) -> Any:
    """A YAML value as its widget shows it."""
    kind = field.kind
    if kind == "checkbox":
        return bool(value)
    if kind == "tristate":
        return "auto" if value is None else "true" if value else "false"
    if kind == "number":
        return value
    if value is None:
        return ""
    if kind == "choice":
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip() if value else ""
    return str(value)


def parsed(field: Field, value: Any) -> Any:
    """A widget's value as YAML: text stays text (TrainConfig reads "a, b" as a list and "5e-5" as a number), a
    mapping is read as YAML."""
    kind = field.kind
    if kind == "checkbox":
        return bool(value)
    if kind == "tristate":
        return {"auto": None, "true": True, "false": False}[value or "auto"]
    if kind in ("number", "optional_number"):
        if value is None or str(value).strip() == "":
            return None
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{field.name} must be a number, got {value!r}.") from None
        return int(number) if number.is_integer() and int in _kinds(field.setting.type) else number
    text = "" if value is None else str(value).strip()
    if not text:  # emptied: null where the key takes null, else its default
        return None if type(None) in _kinds(field.setting.type) else field.setting.default
    if dict in _kinds(field.setting.type):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{field.name} must be a mapping such as {{num_cycles: 2}}, got {text!r}.") from None
    return text


def form_values(document: dict[str, Any]) -> dict[str, Any]:
    """Every field's widget value for a YAML document (defaults where it says nothing)."""
    return {f.name: shown(f, document.get(f.name, f.setting.default)) for f in fields()}


def to_document(values: dict[str, Any], loaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML document for the form's `values`: the keys that differ from their default, plus every key of the
    `loaded` document (kept as written when its widget still shows it, so a hand-written YAML round-trips unchanged,
    keys the form does not show included)."""
    loaded = dict(loaded or {})
    by_name = fields_by_name()
    out: dict[str, Any] = {}
    for name, field in by_name.items():
        if name not in values:
            if name in loaded:
                out[name] = loaded[name]
            continue
        if name in loaded and shown(field, loaded[name]) == values[name]:
            out[name] = loaded[name]
            continue
        value = parsed(field, values[name])
        if name in loaded or value != field.setting.default:
            out[name] = value
    out.update({k: v for k, v in loaded.items() if k not in by_name})
    return {k: out[k] for k in [*loaded, *(k for k in out if k not in loaded)]}  # the file's own order first


def read_document(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a flat mapping (the same file `peftkit train` reads)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"Config file '{p}' does not exist.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file '{p}' is not valid YAML: {e}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{p}' must hold `key: value` lines at the top level.")
    return data


def dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def train_command(config_path: str | Path) -> list[str]:
    """The command the UI runs, as a person would type it."""
    return ["peftkit", TRAIN_COMMAND, str(config_path)]


def runnable(command: list[str]) -> list[str]:
    """`peftkit ...` through this interpreter, so the UI's environment is the run's."""
    return [sys.executable, "-m", "peftkit", *command[1:]] if command[:1] == ["peftkit"] else command


def default_output_dir(root: str | Path, model: str | None, method: str) -> str:
    """A fresh folder per run, as LLaMA-Factory names them: <root>/<model>/<method>/train_<date-time>."""
    name = re.sub(r"[^\w.-]+", "_", Path(str(model or "model").rstrip("/")).name) or "model"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    return str(Path(root) / name / method / f"train_{stamp}")


def dataset_names(dataset_dir: str | None) -> list[str]:
    """The names in `dataset_dir/dataset_info.json`, or none when it has no such file."""
    try:
        registry = load_registry(dataset_dir or "")
    except PeftkitError:
        return []
    return sorted(registry or {})


def model_choices() -> list[str]:
    return sorted(BUILTIN_MODELS)


# --- checks, each message shown next to its field ---
def check(document: dict[str, Any], *, resume: bool = False) -> dict[str, str]:
    """Problems with a training document, by key: what `peftkit train` would refuse before any work, plus paths that
    do not exist. Empty when the run can start."""
    problems: dict[str, str] = {}
    model = str(document.get("model_name_or_path") or "")
    if not model:
        problems["model_name_or_path"] = "Choose a model: a built-in alias, a local folder or a hub id."
    elif model not in BUILTIN_MODELS and (model.startswith((".", "/", "~")) or model.count("/") > 1) \
            and not Path(model).expanduser().exists():
        problems["model_name_or_path"] = f"The folder '{model}' does not exist."
    dataset_dir = str(document.get("dataset_dir") or "data")
    known = dataset_names(dataset_dir)
    if not Path(dataset_dir).expanduser().is_dir():
        problems["dataset_dir"] = f"The dataset directory '{dataset_dir}' does not exist."
    elif document.get("dataset") and not known and not resume:
        problems["dataset_dir"] = f"'{dataset_dir}' has no dataset_info.json listing the datasets."
    elif document.get("dataset"):
        missing = [n for n in split_names(document["dataset"]) if n not in known]
        if missing:
            problems["dataset"] = f"Not in {dataset_dir}/dataset_info.json: {', '.join(missing)}."
    if not document.get("dataset"):
        problems.setdefault("dataset", "Choose at least one dataset.")
    out = document.get("output_dir")
    if out:
        try:
            check_output_dir(out, bool(document.get("overwrite_output_dir")),
                             document.get("resume_from_checkpoint"))
        except ConfigError as e:
            problems["output_dir"] = str(e)
    if not problems:
        try:
            TrainConfig.from_dict(document)
        except ConfigError as e:
            problems[_key_named(str(e))] = str(e)
    return problems


def _key_named(message: str) -> str:
    """The field an error message is about: the first key it names (the form's message line otherwise)."""
    names = sorted(fields_by_name(), key=len, reverse=True)
    found = [(message.find(n), n) for n in names if re.search(rf"\b{re.escape(n)}\b", message)]
    return min(found)[1] if found else "_form"
