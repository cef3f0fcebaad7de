"""Where data comes from: LLaMA-Factory's `dataset_info.json` registry, plain file paths, and the file readers."""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.atomic import write_text

DATA_CONFIG = "dataset_info.json"
EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "ranking", "split", "num_samples", "subset", "folder",
               "file_sha1", *_HUB_KEYS}


@dataclasses.dataclass
class DatasetAttr:
    """One dataset as `dataset_info.json` describes it, resolved to files on disk."""

    name: str
    files: list[Path]
    formatting: str | None = "alpaca"  # None: detect from the first row (unregistered files)
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    split: str = "train"
    num_samples: int | None = None
    entry: dict[str, Any] = dataclasses.field(default_factory=dict)  # the raw registry entry, for cache keys
    ranking: bool = False  # preference pairs (chosen/rejected)


def split_names(dataset: list[str] | str | None) -> list[str]:
    """Accept LLaMA-Factory's `a,b` as well as a list."""
    if dataset is None:
        return []
    items = dataset.split(",") if isinstance(dataset, str) else list(dataset)
    return [str(n).strip() for n in items if str(n).strip()]


def load_registry(dataset_dir: str | Path) -> dict[str, dict[str, Any]] | None:
    path = Path(dataset_dir) / DATA_CONFIG
    if not path.is_file():
        return None
    try:
        registry = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix the file or remove it.") from e
    if not isinstance(registry, dict):
        raise ConfigError(f"{path} must map dataset names to entries, like LLaMA-Factory's data/{DATA_CONFIG}.")
    return registry


def resolve_datasets(dataset: list[str] | str, dataset_dir: str | Path, kind: str = "sft",
                     stage: str = "sft") -> list[DatasetAttr]:
    """Turn dataset names (registry names or file paths) into file lists plus their format settings. A registered
    dataset whose shape does not fit the stage's `kind` of rows (formats.KINDS) is refused here, before any work."""
    names = split_names(dataset)
    if not names:
        raise ConfigError("No dataset given; set `dataset` to a name in dataset_info.json or a data file path.")
    dataset_dir = Path(dataset_dir)
    registry = load_registry(dataset_dir)
    attrs = []
    for name in names:
        if registry is not None and name in registry:
            attrs.append(_from_entry(name, registry[name], dataset_dir, kind, stage))
            continue
        path = _as_data_path(name, dataset_dir)
        if path is not None:
            files = _files_in(path, name)
            if EXTENSIONS[files[0].suffix.lower()] == "text":
                _check_kind(name, kind, stage, "text")
                attrs.append(DatasetAttr(name=name, files=files, columns={"prompt": "text"}))
            else:
                attrs.append(DatasetAttr(name=name, files=files, formatting=None))
        elif registry is None:
            raise ConfigError(
                f"Dataset '{name}' is not a data file and there is no {DATA_CONFIG} in dataset_dir '{dataset_dir}'. "
                f"Pass a .json/.jsonl/.csv/.parquet file path, or set dataset_dir to a folder with a {DATA_CONFIG}."
            )
        else:
            close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.5)
            hint = f" Closest names: {', '.join(close)}." if close else ""
            raise ConfigError(
                f"Dataset '{name}' is neither in {dataset_dir / DATA_CONFIG} nor a data file.{hint} "
                "Add an entry with a file_name, or pass a file path."
            )
    return attrs


def dataset_kind(dataset: list[str] | str, dataset_dir: str | Path) -> str:
    """The kind of rows (formats.KINDS) the named datasets hold, from their registry entries or file types: "text"
    only when every one is plain text; a stage that reads either conversations or text (kd) picks by it."""
    registry = load_registry(dataset_dir) or {}
    kinds = set()
    for name in split_names(dataset):
        entry = registry.get(name)
        if isinstance(entry, dict):
            kinds.add(_entry_kind(entry))
        else:
            kinds.add("text" if name.lower().endswith(".txt") else "sft")
    return kinds.pop() if len(kinds) == 1 else "sft"


def _entry_kind(entry: dict[str, Any]) -> str:
    """The kind of rows a registry entry holds: pairs (`ranking`), kto (a `kto_tag` column), text (LLaMA-Factory's
    text datasets: a .txt file, or `columns: {prompt: text}` with no answer column) or sft."""
    columns = entry.get("columns") or {}
    if entry.get("ranking"):
        return "pairs"
    if "kto_tag" in columns:
        return "kto"
    if entry.get("formatting", "alpaca") == "alpaca" and (
            str(entry.get("file_name", "")).lower().endswith(".txt") or columns == {"prompt": "text"}):
        return "text"
    return "sft"


def _check_kind(name: str, kind: str, stage: str, rows: str) -> None:
    """Refuse a dataset holding `rows` (a kind) that cannot be what `stage` trains on (`kind`), saying what is
    missing."""
    ranking = rows == "pairs"
    if kind == "pairs" and not ranking:
        raise ConfigError(f"Dataset '{name}' has no chosen/rejected answers, which stage '{stage}' trains on: register "
                          f"it in {DATA_CONFIG} with \"ranking\": true and its chosen and rejected columns.")
    if kind == "kto" and rows != "kto":
        raise ConfigError(f"Dataset '{name}' has no kto_tag column, which stage '{stage}' needs (true for a desirable "
                          f"answer, false for an undesirable one): add \"kto_tag\" to its columns in {DATA_CONFIG}.")
    if kind == "text":
        if ranking:
            raise ConfigError(f"Dataset '{name}' is a preference dataset (ranking: true); stage '{stage}' trains on "
                              "plain text. Use a text dataset (columns: {prompt: text}) or stage: dpo / rm.")
        return
    if kind != "pairs" and ranking:
        raise ConfigError(f"Dataset '{name}' is a ranking (preference) dataset with chosen/rejected answers; stage "
                          f"'{stage}' needs one answer per prompt. Use it with stage: dpo or rm, or pick another "
                          "dataset.")
    if kind == "sft" and rows == "kto":
        raise ConfigError(f"Dataset '{name}' is a KTO dataset (answers labelled good or bad); stage '{stage}' would "
                          "also learn the bad ones. Use it with stage: kto, or pick an SFT dataset.")
    if rows == "text":
        raise ConfigError(f"Dataset '{name}' is plain text (no prompts with answers); stage '{stage}' cannot train on "
                          "it. Use it with stage: pt.")


def _from_entry(name: str, entry: dict[str, Any], dataset_dir: Path, kind: str = "sft",
                stage: str = "sft") -> DatasetAttr:
    if not isinstance(entry, dict):
        raise ConfigError(f"Entry '{name}' in {DATA_CONFIG} must be an object with at least a file_name.")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, sorted(_ENTRY_KEYS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown key '{key}' in {DATA_CONFIG} entry '{name}'.{hint}")
    columns = entry.get("columns") or {}
    media = [c for c in ("images", "videos", "audios") if c in columns]
    if media:
        raise ConfigError(f"Dataset '{name}' has {'/'.join(media)} columns; peftkit trains on text only. "
                          "Pick a text dataset.")
    _check_kind(name, kind, stage, _entry_kind(entry))
    if "file_name" not in entry:
        where = ", ".join(f"{k}={entry[k]}" for k in _HUB_KEYS if k in entry)
        if where:
            raise ConfigError(
                f"Dataset '{name}' lives on the hub ({where}) and this machine is offline; download it into "
                f"dataset_dir '{dataset_dir}' and add a file_name entry for it in {DATA_CONFIG}."
            )
        raise ConfigError(f"Entry '{name}' in {DATA_CONFIG} has no file_name; add the data file's name.")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise ConfigError(f"Dataset '{name}': formatting '{formatting}' is unknown; use alpaca, sharegpt or openai.")
    split = entry.get("split", "train")
    if split != "train":
        raise ConfigError(
            f"Dataset '{name}' asks for split '{split}', but a local file has only one split; point a separate "
            f"{DATA_CONFIG} entry at the file holding that split."
        )
    path = dataset_dir / entry["file_name"]
    if not path.exists():
        raise ConfigError(f"Dataset '{name}': file_name '{entry['file_name']}' does not exist in '{dataset_dir}'.")
    return DatasetAttr(
        name=name, files=_files_in(path, name), formatting=formatting, columns=dict(entry.get("columns") or {}),
        tags=dict(entry.get("tags") or {}), split=split, num_samples=entry.get("num_samples"), entry=entry,
        ranking=bool(entry.get("ranking")),
    )


def _as_data_path(name: str, dataset_dir: Path) -> Path | None:
    for path in (dataset_dir / name, Path(name).expanduser()):
        if path.is_dir() or (path.is_file() and path.suffix.lower() in EXTENSIONS):
            return path
    return None


def _files_in(path: Path, name: str) -> list[Path]:
    """A file, or every data file of one type in a folder (sorted, so the order is stable)."""
    if path.is_file():
        if path.suffix.lower() not in EXTENSIONS:
            raise ConfigError(f"Dataset '{name}': '{path}' has an unknown type; use .json, .jsonl, .csv, .parquet or "
                              ".txt.")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise ConfigError(f"Dataset '{name}': folder '{path}' holds no .json/.jsonl/.csv/.parquet/.txt files.")
    kinds = {EXTENSIONS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise ConfigError(f"Dataset '{name}': folder '{path}' mixes file types ({', '.join(sorted(kinds))}); keep one.")
    return files


def read_rows(attr: DatasetAttr) -> list[Any]:
    """Read every row of a dataset's files, in file order.

    JSON rows that are not objects stay in the list, so the caller skips and counts them under their row number.
    """
    rows: list[Any] = []
    for path in attr.files:
        kind = EXTENSIONS[path.suffix.lower()]
        if kind == "text":  # one document per non-empty line, as LLaMA-Factory reads a .txt file
            rows.extend({"text": line} for line in read_text(path).splitlines() if line.strip())
        else:
            rows.extend(_read_json(path) if kind == "json" else _read_csv(path) if kind == "csv"
                        else _read_parquet(path))
    return rows


def read_text(path: Path) -> str:
    """A UTF-8 file's text, without the byte-order mark some Windows editors write."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} (line {line}) "
                          "is invalid; re-save the file as UTF-8.") from None
    return text.removeprefix("\ufeff")


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    kinds = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object"}
    return kinds.get(type(value), type(value).__name__)


def _read_json(path: Path) -> list[Any]:
    """A JSON array of objects, or JSON lines; plain `json` is much faster than `datasets` for files this size."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}.") from e
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}, line {i}, is not valid JSON: {e}. Fix or delete that line.") from e
    if rows and not any(isinstance(r, dict) for r in rows):
        kinds = ", ".join(sorted({json_kind(r) for r in rows}))
        raise ConfigError(f"{path} holds no JSON object (only {kinds}); it must hold a JSON array of objects, "
                          "or one JSON object per line.")
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    return [dict(r) for r in csv.DictReader(io.StringIO(read_text(path), newline=""))]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ConfigError(f"Reading {path} needs the `datasets` package: pip install datasets") from e
    # A local file goes through the packaged parquet builder: no network access is attempted.
    return load_dataset("parquet", data_files=[str(path)], split="train").to_list()


def write_dataset(output: Path, rows: list[Any], name: str, entry: dict[str, Any],
                  registry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `rows` to `output` (a JSON array, or JSON lines for .jsonl), then register it as `name` with `entry`'s
    format keys in the dataset_info.json beside it (other entries kept); both written atomically. Returns the entry."""
    if output.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    write_text(output, text)
    registry = (load_registry(output.parent) or {}) if registry is None else registry
    registry[name] = {"file_name": output.name, **entry}
    write_text(output.parent / DATA_CONFIG, json.dumps(registry, ensure_ascii=False, indent=2) + "\n")
    return registry[name]
