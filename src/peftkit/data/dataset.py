"""The SFT data pipeline: load and convert datasets, tokenize with labels, split, pack, and cache the result."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io.atomic import atomic_write
from .formats import Conversation, RowError, detect_format, to_conversation
from .packing import pack
from .sources import DatasetAttr, read_rows, resolve_datasets, split_names
from .templates import ChatTemplate, StringTemplate, Template, encode_counted, get_template

logger = logging.getLogger("peftkit.data")

CACHE_VERSION = 3  # bump whenever a change here, in formats or in templates changes the tokenized output or report
SHOWN_SKIPS = 3


@dataclasses.dataclass
class DatasetStats:
    """What happened to one dataset's rows."""

    name: str
    rows: int = 0  # rows read (after num_samples and max_samples)
    loaded: int = 0  # rows that became valid conversations
    tokenized: int = 0  # conversations that became training examples
    truncated: int = 0  # examples cut to cutoff_len
    labels_cut: int = 0  # label (answer) tokens those cuts dropped
    skipped: int = 0  # rows dropped at any stage
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    first_skips: list[str] = dataclasses.field(default_factory=list)  # "row 7: empty answer"

    def skip(self, row: int, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.first_skips) < SHOWN_SKIPS:
            self.first_skips.append(f"row {row}: {reason}")

    def describe_skips(self) -> str:
        counts = "; ".join(f"{n}x {reason}" for reason, n in collections.Counter(self.reasons).most_common())
        return f"skipped {self.skipped} of {self.rows} rows ({counts}). First: " + " | ".join(self.first_skips)


@dataclasses.dataclass
class DataReport:
    """Per-dataset counts of loaded, skipped (with reasons) and truncated rows."""

    datasets: dict[str, DatasetStats] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        lines = []
        for s in self.datasets.values():
            line = f"{s.name}: {s.rows} rows, {s.loaded} conversations"
            if s.tokenized or s.truncated:
                cut = f", {s.labels_cut} answer tokens cut" if s.truncated else ""
                line += f", {s.tokenized} examples ({s.truncated} truncated{cut})"
            if s.skipped:
                line += f", {s.skipped} skipped"
            lines.append(line)
        return "\n".join(lines)

    def log(self, message: str, *args: Any) -> None:
        """Log `message` and the summary; a warning when cutoff_len cut examples, which a user should see."""
        if any(s.truncated for s in self.datasets.values()):
            logger.warning(message + "\n%s\nRaise cutoff_len to train on the cut tokens.", *args, self.summary())
        else:
            logger.info(message + "\n%s", *args, self.summary())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataReport":
        known = {f.name for f in dataclasses.fields(DatasetStats)}  # other versions' caches may lack or add fields
        return cls(datasets={name: DatasetStats(**{k: v for k, v in stats.items() if k in known})
                             for name, stats in d.get("datasets", {}).items()})


def load_conversations(dataset: list[str] | str, dataset_dir: str, *, max_samples: int | None = None,
                       seed: int = 42) -> tuple[list[Conversation], DataReport]:
    """Read datasets (names in dataset_info.json, or file paths) as canonical conversations, skipping bad rows."""
    report = DataReport()
    return _load(resolve_datasets(dataset, dataset_dir), max_samples, seed, report), report


def _load(attrs: list[DatasetAttr], max_samples: int | None, seed: int, report: DataReport) -> list[Conversation]:
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ConfigError(f"max_samples must be a positive integer (or unset for all rows), got {max_samples!r}.")
    conversations = []
    for attr in attrs:
        rows = read_rows(attr)
        indices = list(range(len(rows)))
        if attr.num_samples:  # LLaMA-Factory: a random subset, or repeats when asking for more than there are
            rng = np.random.default_rng(seed)
            indices = rng.permutation(len(rows))[: attr.num_samples].tolist()
            if attr.num_samples > len(rows):
                indices += rng.choice(len(rows), attr.num_samples - len(rows)).tolist()
        if max_samples is not None:
            indices = indices[:max_samples]
        if not indices:
            raise ConfigError(f"Dataset '{attr.name}' has no rows ({', '.join(map(str, attr.files))}).")
        formatting, columns, tags = attr.formatting, attr.columns, attr.tags
        if formatting is None:  # detect it from the first object; with none, every row is skipped below
            first = next((rows[i] for i in indices if isinstance(rows[i], dict)), None)
            if first is not None:
                formatting, columns, tags = detect_format(first, attr.name)
        stats = report.datasets.setdefault(attr.name, DatasetStats(attr.name))
        stats.rows += len(indices)
        for i in indices:
            try:
                conv = to_conversation(rows[i], formatting, columns, tags)
            except RowError as e:
                stats.skip(i, str(e))
                continue
            conv.source, conv.row = attr.name, i
            conversations.append(conv)
            stats.loaded += 1
        if stats.loaded == 0:
            how = f" ({formatting} format)" if formatting else ""
            raise ConfigError(
                f"Dataset '{attr.name}' has no usable rows{how}: {stats.describe_skips()}. "
                "Check its `formatting`, `columns` and `tags` in dataset_info.json."
            )
        if stats.skipped:
            logger.warning("Dataset '%s': %s", attr.name, stats.describe_skips())
    return conversations


def default_cache_dir() -> Path:
    home = os.environ.get("PEFTKIT_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "peftkit") / "datasets"


def build_sft_dataset(
    tokenizer: Any,
    dataset: list[str] | str,
    dataset_dir: str,
    *,
    template: str | None = None,
    cutoff_len: int = 2048,
    max_samples: int | None = None,
    val_size: float | int = 0.0,
    eval_dataset: list[str] | str | None = None,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    enable_thinking: bool = True,
    packing: bool = False,
    seed: int = 42,
    cache_dir: str | None = None,
    overwrite_cache: bool = False,
) -> tuple[list[dict], list[dict] | None]:
    """Tokenized SFT examples (input_ids, labels; packed rows add position_ids, seq_lens): (train, eval or None).

    `eval_dataset` wins over `val_size`; with `packing` both splits are packed. The result is cached on disk, keyed
    by everything that changes it, so a second run starts at once.
    """
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 2:
        raise ConfigError(f"cutoff_len must be an integer >= 2, got {cutoff_len!r}.")
    _check_val_size(val_size)
    if split_names(eval_dataset) and val_size:
        logger.warning("Both eval_dataset and val_size are set; using eval_dataset and ignoring val_size.")
        val_size = 0.0
    chat = get_template(template, tokenizer, enable_thinking=enable_thinking)
    train_attrs = resolve_datasets(dataset, dataset_dir)
    eval_attrs = resolve_datasets(eval_dataset, dataset_dir) if split_names(eval_dataset) else []
    settings = dict(template=_template_id(chat), cutoff_len=cutoff_len, max_samples=max_samples, val_size=val_size,
                    train_on_prompt=train_on_prompt, mask_history=mask_history, enable_thinking=enable_thinking,
                    packing=packing, seed=seed)
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / f"sft-{_cache_key(tokenizer, train_attrs, eval_attrs, settings)}.npz"
    if not overwrite_cache and path.exists():
        cached = _read_cache(path)
        if cached is not None:
            return cached

    report = DataReport()
    opts = dict(cutoff_len=cutoff_len, train_on_prompt=train_on_prompt, mask_history=mask_history)
    train = _tokenize(_load(train_attrs, max_samples, seed, report), chat, tokenizer, report, "train", **opts)
    if eval_attrs:
        evals: list[dict] | None = _tokenize(_load(eval_attrs, max_samples, seed, report), chat, tokenizer, report,
                                             "eval", **opts)
    elif val_size:
        train, evals = _split(train, val_size, seed)
    else:
        evals = None
    if packing:
        train = pack(train, cutoff_len)
        evals = pack(evals, cutoff_len) if evals is not None else None
    report.log("SFT data:")
    _write_cache(path, train, evals, report)
    return train, evals


def _check_val_size(val_size: float | int) -> None:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0:
        raise ConfigError(f"val_size must be a fraction in (0, 1) or a count >= 1, got {val_size!r}.")
    if not (val_size < 1 or float(val_size).is_integer()):
        raise ConfigError(f"val_size={val_size} is neither a fraction in (0, 1) nor a whole count of examples.")


def _split(examples: list[dict], val_size: float | int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random held-out set; the training examples keep their order."""
    n = len(examples)
    n_val = max(1, round(n * val_size)) if val_size < 1 else int(val_size)
    if n_val >= n:
        raise ConfigError(f"val_size={val_size} takes {n_val} of {n} examples and leaves none to train on; lower it.")
    held = set(random.Random(seed).sample(range(n), n_val))
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _tokenize(conversations: list[Conversation], chat: Template, tokenizer: Any, report: DataReport, split: str, *,
              cutoff_len: int, train_on_prompt: bool, mask_history: bool) -> list[dict]:
    examples = []
    for conv in tqdm(conversations, desc=f"Tokenizing {split}", unit="conv", mininterval=1.0):
        stats = report.datasets[conv.source]
        try:
            example, truncated, labels_cut = encode_counted(conv, chat, tokenizer, cutoff_len=cutoff_len,
                                                            train_on_prompt=train_on_prompt, mask_history=mask_history)
        except RowError as e:
            stats.skip(conv.row, str(e))
            continue
        stats.tokenized += 1
        stats.truncated += truncated
        stats.labels_cut += labels_cut
        examples.append(example)
    for name in dict.fromkeys(c.source for c in conversations):
        stats = report.datasets[name]
        if not stats.tokenized:
            raise ConfigError(f"Dataset '{name}' has no examples left after tokenizing: {stats.describe_skips()}. "
                              "Raise cutoff_len, or check the template.")
        if stats.skipped > stats.rows - stats.loaded:
            logger.warning("Dataset '%s' after tokenizing: %s", name, stats.describe_skips())
    return examples


def _template_id(chat: Template) -> Any:
    if isinstance(chat, StringTemplate):
        return dataclasses.asdict(chat)
    return {"chat_template": chat.chat_template} if isinstance(chat, ChatTemplate) else chat.name


def _cache_key(tokenizer: Any, train_attrs: list[DatasetAttr], eval_attrs: list[DatasetAttr],
               settings: dict[str, Any]) -> str:
    def describe(attrs: list[DatasetAttr]) -> list[Any]:
        out = []
        for a in attrs:
            files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in a.files]
            out.append([a.name, a.entry, files])
        return out

    probe = "Hello world! 123 \n\n  你好 <tool_call>"  # catches a different vocabulary under the same name
    tok = [getattr(tokenizer, "name_or_path", ""), type(tokenizer).__name__, len(tokenizer),
           getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token,
           tokenizer.encode(probe, add_special_tokens=False)]
    blob = json.dumps([CACHE_VERSION, describe(train_attrs), describe(eval_attrs), tok, settings],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _write_cache(path: Path, train: list[dict], evals: list[dict] | None, report: DataReport) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written cache."""
    arrays: dict[str, np.ndarray] = {"report": np.array(json.dumps(report.to_dict()))}
    for split, rows in (("train", train), ("eval", evals)):
        if rows is None:
            continue
        arrays[f"{split}_ids"] = np.fromiter((t for r in rows for t in r["input_ids"]), dtype=np.int32)
        arrays[f"{split}_labels"] = np.fromiter((t for r in rows for t in r["labels"]), dtype=np.int32)
        arrays[f"{split}_lens"] = np.array([len(r["input_ids"]) for r in rows], dtype=np.int64)
        arrays[f"{split}_nseq"] = np.array([len(r.get("seq_lens", ())) for r in rows], dtype=np.int64)
        arrays[f"{split}_seq_lens"] = np.array([n for r in rows for n in r.get("seq_lens", ())], dtype=np.int64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
                np.savez(f, **arrays)

        atomic_write(path, write)
    except OSError as e:  # a read-only or full disk costs the next run time, not this one
        logger.warning("Could not write the dataset cache %s (%s); the next run will tokenize again.", path, e)


def _read_cache(path: Path) -> tuple[list[dict], list[dict] | None] | None:
    start = time.perf_counter()
    try:
        with np.load(path, allow_pickle=False) as z:
            splits = [_rows_from(z, s) if f"{s}_ids" in z else None for s in ("train", "eval")]
            report = DataReport.from_dict(json.loads(str(z["report"])))
    except Exception as e:  # noqa: BLE001 -- any unreadable cache is simply rebuilt
        logger.warning("Ignoring unreadable dataset cache %s (%s); tokenizing again.", path, e)
        return None
    train, evals = splits
    report.log("Loaded %d train / %s eval examples from cache %s in %.2f s (overwrite_cache=True rebuilds it).",
               len(train), len(evals) if evals is not None else 0, path, time.perf_counter() - start)
    return train, evals


def _rows_from(z: Any, split: str) -> list[dict]:
    lens, nseq = z[f"{split}_lens"], z[f"{split}_nseq"]
    bounds = np.cumsum(lens)[:-1]
    ids, labels = np.split(z[f"{split}_ids"], bounds), np.split(z[f"{split}_labels"], bounds)
    seq_lens = np.split(z[f"{split}_seq_lens"], np.cumsum(nseq)[:-1]) if nseq.any() else None
    rows = []
    for k in range(len(lens)):
        row = {"input_ids": ids[k].tolist(), "labels": labels[k].tolist()}
        if seq_lens is not None and nseq[k]:
            row["seq_lens"] = seq_lens[k].tolist()
            row["position_ids"] = [p for n in row["seq_lens"] for p in range(n)]
        rows.append(row)
    return rows
