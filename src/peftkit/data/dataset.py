"""The data pipeline of every stage: load and convert datasets, tokenize with labels, split, pack, and cache.

What a stage's examples hold depends on its kind of rows (formats.KINDS):
- sft: input_ids, labels (IGNORE_INDEX on prompt tokens); packed rows add position_ids and seq_lens;
- text: input_ids, labels (every token): documents, each ended with EOS, joined and cut into cutoff_len blocks
  (LLaMA-Factory's pretraining layout), or with packing off one truncated document per example;
- pairs: chosen_ids, chosen_labels, rejected_ids, rejected_labels (labels on the last answer only);
- kto: input_ids, labels, kto_tag (1 desirable, 0 not), kl_ids, kl_labels: the same prompt with the answer of
  another example, for KTO's reference point (the KL estimate from mismatched pairs);
- prompts: prompt_ids (the turns rendered up to the assistant's turn, as chat renders them), columns (the row as
  JSON, for reward functions).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io.atomic import atomic_write
from .formats import Conversation, RowError, detect_format, to_conversation
from .mixing import describe_mix, mix
from .packing import pack
from .sources import EXTENSIONS, DatasetAttr, read_rows, resolve_datasets, split_names
from .templates import ChatTemplate, StringTemplate, Template, encode_counted, get_template

logger = logging.getLogger("peftkit.data")

# A vocabulary's fingerprint: the ids of mixed text tell two tokenizers under one name (or two models) apart.
VOCAB_PROBE = "Hello world! 123 \n\n  你好 <tool_call>"
CACHE_VERSION = 5  # bump whenever a change here, in formats or in templates changes the tokenized output or report
SHOWN_SKIPS = 3


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers give the same ids: the same size and the same ids for a probe of mixed text."""
    return len(a) == len(b) and a.encode(VOCAB_PROBE) == b.encode(VOCAB_PROBE)


@dataclasses.dataclass
class DatasetStats:
    """What happened to one dataset's rows."""

    name: str
    rows: int = 0  # rows read (after num_samples and max_samples)
    loaded: int = 0  # rows that became valid conversations
    tokenized: int = 0  # conversations that became training examples
    contributed: int = 0  # examples the mix took into training (repeats counted; packing may join them)
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
            if s.contributed:
                line += f"; {s.contributed} in training"
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
                       seed: int = 42, kind: str = "sft", stage: str = "sft") -> tuple[list[Conversation], DataReport]:
    """Read datasets (names in dataset_info.json, or file paths) as canonical conversations, skipping bad rows."""
    report = DataReport()
    attrs = resolve_datasets(dataset, dataset_dir, kind, stage)
    return read_conversations(attrs, max_samples, seed, report, kind), report


def read_conversations(attrs: list[DatasetAttr], max_samples: int | None, seed: int, report: DataReport,
                       kind: str = "sft") -> list[Conversation]:
    """Resolved datasets' rows as conversations (after num_samples and max_samples); bad rows skipped into `report`."""
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
                formatting, columns, tags = detect_format(first, attr.name, kind)
        stats = report.datasets.setdefault(attr.name, DatasetStats(attr.name))
        stats.rows += len(indices)
        for i in indices:
            try:
                conv = to_conversation(rows[i], formatting, columns, tags, kind)
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


# None, one eval set's examples, or several by name (reported apart: eval_<name>_loss)
EvalSets = list[dict] | dict[str, list[dict]] | None


def build_sft_dataset(tokenizer: Any, dataset: list[str] | str, dataset_dir: str, **kwargs: Any
                      ) -> tuple[list[dict], EvalSets]:
    """`build_dataset` for SFT conversations (the default stage)."""
    return build_dataset(tokenizer, dataset, dataset_dir, kind="sft", **kwargs)


def build_dataset(
    tokenizer: Any,
    dataset: list[str] | str,
    dataset_dir: str,
    *,
    kind: str = "sft",
    stage: str | None = None,
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
    mix_strategy: str = "concat",
    interleave_probs: list[float] | None = None,
    cache_dir: str | None = None,
    overwrite_cache: bool = False,
) -> tuple[list[dict], EvalSets]:
    """Tokenized examples of `kind` (see the module's docstring): (train, eval sets).

    Several training datasets are combined by `mix_strategy` (data/mixing.py). The eval sets are `eval_dataset`, or
    `val_size` of each training dataset: None, one set's examples, or several sets by name. With `packing` every
    split is packed. The result is cached on disk, keyed by everything that changes it, so a second run starts at once.
    """
    stage = stage or kind
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 2:
        raise ConfigError(f"cutoff_len must be an integer >= 2, got {cutoff_len!r}.")
    if packing and kind in ("pairs", "kto", "prompts"):
        raise ConfigError(f"packing: true cannot be used with stage '{stage}': its examples are compared with each "
                          "other, not trained one by one. Set packing: false.")
    _check_val_size(val_size)
    if split_names(eval_dataset) and val_size:
        logger.warning("Both eval_dataset and val_size are set; using eval_dataset and ignoring val_size.")
        val_size = 0.0
    chat = get_template(template, tokenizer, enable_thinking=enable_thinking)
    train_attrs = resolve_datasets(dataset, dataset_dir, kind, stage)
    eval_attrs = resolve_datasets(eval_dataset, dataset_dir, kind, stage) if split_names(eval_dataset) else []
    settings = dict(template=_template_id(chat), cutoff_len=cutoff_len, max_samples=max_samples, val_size=val_size,
                    train_on_prompt=train_on_prompt, mask_history=mask_history, enable_thinking=enable_thinking,
                    packing=packing, seed=seed, kind=kind, mix_strategy=mix_strategy, interleave_probs=interleave_probs)
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / f"{kind}-{_cache_key(tokenizer, train_attrs, eval_attrs, settings)}.npz"
    if not overwrite_cache and path.exists():
        cached = _read_cache(path)
        if cached is not None:
            return cached

    report = DataReport()
    opts = dict(cutoff_len=cutoff_len, train_on_prompt=train_on_prompt, mask_history=mask_history,
                kind=kind, packing=packing)

    def examples_of(attr: DatasetAttr, split: str) -> list[dict]:
        conversations = read_conversations([attr], max_samples, seed, report, kind)
        return _tokenize(conversations, chat, tokenizer, report, split, **opts)

    parts = [(attr.name, examples_of(attr, "train")) for attr in train_attrs]
    if eval_attrs:
        held = [(attr.name, examples_of(attr, "eval")) for attr in eval_attrs]
    elif val_size:  # each dataset's own share held out before mixing: a repeated row never lands on both sides
        splits = [(name, *_split(examples, val_size, seed, name)) for name, examples in parts]
        parts = [(name, kept) for name, kept, _ in splits]
        held = [(name, out) for name, _, out in splits]
    else:
        held = []
    train, counts = mix(parts, mix_strategy, interleave_probs, seed)
    for name, n in counts.items():
        report.datasets[name].contributed += n
    if len(parts) > 1:
        logger.info("Mixed by %s", describe_mix(mix_strategy, counts, {name: len(e) for name, e in parts}))
    if packing and kind == "sft":
        train = pack(train, cutoff_len)
        held = [(name, pack(examples, cutoff_len)) for name, examples in held]
    evals = _eval_sets(held)
    report.log(f"{stage} data:")
    _write_cache(path, train, evals, report)
    return train, evals


def eval_set_name(dataset: str) -> str:
    """A dataset's name as its metrics spell it (eval_<name>_loss): a file path's stem, unusual characters as _."""
    path = Path(dataset)
    stem = path.stem if "/" in dataset or path.suffix.lower() in EXTENSIONS else dataset
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "eval"


def _eval_sets(held: list[tuple[str, list[dict]]]) -> EvalSets:
    """No set (None), one (its examples), or several by name (each reported apart, as transformers' dict eval sets)."""
    if not held:
        return None
    if len(held) == 1:
        return held[0][1]
    sets: dict[str, list[dict]] = {}
    for dataset, examples in held:
        name = eval_set_name(dataset)
        while name in sets:  # the same dataset twice, or two files with one stem
            name += "_"
        sets[name] = examples
    return sets


def _check_val_size(val_size: float | int) -> None:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0:
        raise ConfigError(f"val_size must be a fraction in (0, 1) or a count >= 1, got {val_size!r}.")
    if not (val_size < 1 or float(val_size).is_integer()):
        raise ConfigError(f"val_size={val_size} is neither a fraction in (0, 1) nor a whole count of examples.")


def _split(examples: list[dict], val_size: float | int, seed: int, name: str) -> tuple[list[dict], list[dict]]:
    """A seeded random held-out set; the training examples keep their order."""
    n = len(examples)
    n_val = max(1, round(n * val_size)) if val_size < 1 else int(val_size)
    if n_val >= n:
        raise ConfigError(f"val_size={val_size} takes {n_val} of the {n} examples of dataset '{name}' and leaves none "
                          "to train on; lower it.")
    held = set(random.Random(seed).sample(range(n), n_val))
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _tokenize(conversations: list[Conversation], chat: Template, tokenizer: Any, report: DataReport, split: str, *,
              cutoff_len: int, train_on_prompt: bool, mask_history: bool, kind: str = "sft",
              packing: bool = False) -> list[dict]:
    if kind == "text":
        examples = _documents(conversations, tokenizer, report, split, cutoff_len, packing)
    else:
        examples = []
        for k, conv in enumerate(tqdm(conversations, desc=f"Tokenizing {split}", unit="conv", mininterval=1.0)):
            stats = report.datasets[conv.source]
            try:
                if kind == "pairs":
                    example, truncated, labels_cut = _pair_example(conv, chat, tokenizer, cutoff_len)
                elif kind == "prompts":
                    example, truncated, labels_cut = _prompt_example(conv, chat, tokenizer, cutoff_len)
                elif kind == "kto":
                    other = conversations[(k + 1) % len(conversations)]  # the mismatched answer of KTO's KL term
                    example, truncated, labels_cut = _kto_example(conv, other, chat, tokenizer, cutoff_len)
                else:
                    example, truncated, labels_cut = encode_counted(conv, chat, tokenizer, cutoff_len=cutoff_len,
                                                                    train_on_prompt=train_on_prompt,
                                                                    mask_history=mask_history)
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


def _documents(conversations: list[Conversation], tokenizer: Any, report: DataReport, split: str, cutoff_len: int,
               packing: bool) -> list[dict]:
    """Pretraining examples: each document tokenized (with the tokenizer's own BOS, if it adds one) and ended with
    EOS; with `packing`, all joined and cut into blocks of cutoff_len (the last, shorter block dropped when there is
    a full one, as LLaMA-Factory does), else one truncated document per example. Every token is a label."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("The tokenizer has no EOS token to end pretraining documents with; set one "
                          "(tokenizer.eos_token) or use a model whose tokenizer defines it.")
    docs = []
    for conv in tqdm(conversations, desc=f"Tokenizing {split}", unit="doc", mininterval=1.0):
        stats = report.datasets[conv.source]
        ids = list(tokenizer(conv.text, add_special_tokens=True)["input_ids"]) + [eos]
        stats.tokenized += 1
        if not packing and len(ids) > cutoff_len:
            stats.truncated += 1
            stats.labels_cut += len(ids) - cutoff_len
            ids = ids[:cutoff_len]
        docs.append(ids)
    if not packing:
        return [{"input_ids": ids, "labels": list(ids)} for ids in docs if len(ids) >= 2]
    stream = [t for ids in docs for t in ids]
    blocks = [stream[i:i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
    if len(blocks) > 1 and len(blocks[-1]) < cutoff_len:
        blocks.pop()
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) >= 2]


def _pair_example(conv: Conversation, chat: Template, tokenizer: Any, cutoff_len: int
                  ) -> tuple[dict[str, list[int]], bool, int]:
    """Chosen and rejected conversations encoded alike, labels on the last answer only (the one being compared)."""
    rejected = dataclasses.replace(conv, messages=conv.messages[:-1] + [conv.rejected])
    a, cut_a, lost_a = encode_counted(conv, chat, tokenizer, cutoff_len=cutoff_len, mask_history=True)
    b, cut_b, lost_b = encode_counted(rejected, chat, tokenizer, cutoff_len=cutoff_len, mask_history=True)
    if a["input_ids"] == b["input_ids"]:
        raise RowError("chosen and rejected answers are identical after tokenization")
    return ({"chosen_ids": a["input_ids"], "chosen_labels": a["labels"], "rejected_ids": b["input_ids"],
             "rejected_labels": b["labels"]}, cut_a or cut_b, lost_a + lost_b)


def _kto_example(conv: Conversation, other: Conversation, chat: Template, tokenizer: Any, cutoff_len: int
                 ) -> tuple[dict[str, Any], bool, int]:
    """The example, its tag, and its prompt followed by another example's answer (KTO's mismatched pair)."""
    example, truncated, labels_cut = encode_counted(conv, chat, tokenizer, cutoff_len=cutoff_len, mask_history=True)
    answer = other.messages[-1] if other is not conv else conv.messages[-1]
    mismatched = dataclasses.replace(conv, messages=conv.messages[:-1] + [answer])
    kl, _, _ = encode_counted(mismatched, chat, tokenizer, cutoff_len=cutoff_len, mask_history=True)
    return ({"input_ids": example["input_ids"], "labels": example["labels"], "kto_tag": int(bool(conv.kto_tag)),
             "kl_ids": kl["input_ids"], "kl_labels": kl["labels"]}, truncated, labels_cut)


def _prompt_example(conv: Conversation, chat: Template, tokenizer: Any, cutoff_len: int
                    ) -> tuple[dict[str, Any], bool, int]:
    """The prompt rendered up to the assistant's turn, exactly as `peftkit chat` renders it, and the row's columns."""
    text = chat.render(conv.messages, tokenizer, tools=conv.tools, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) > cutoff_len:
        raise RowError(f"prompt of {len(ids)} tokens is longer than cutoff_len ({cutoff_len})")
    return {"prompt_ids": ids, "columns": json.dumps(conv.columns or {}, ensure_ascii=False, default=str)}, False, 0


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

    tok = [getattr(tokenizer, "name_or_path", ""), type(tokenizer).__name__, len(tokenizer),
           getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token,
           tokenizer.encode(VOCAB_PROBE, add_special_tokens=False)]
    blob = json.dumps([CACHE_VERSION, describe(train_attrs), describe(eval_attrs), tok, settings],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _write_cache(path: Path, train: list[dict], evals: EvalSets, report: DataReport) -> None:
    """Every field of every example as flat arrays (lists concatenated with their lengths, numbers as one array).
    Written to a temporary file, then renamed: a crash never leaves a half-written cache."""
    arrays: dict[str, np.ndarray] = {"report": np.array(json.dumps(report.to_dict()))}
    splits: list[tuple[str, list[dict]]] = [("train", train)]
    if isinstance(evals, dict):  # several sets: eval0, eval1, ... and their names in order
        arrays["eval_names"] = np.array(json.dumps(list(evals)))
        splits += [(f"eval{i}", rows) for i, rows in enumerate(evals.values())]
    elif evals is not None:
        splits.append(("eval", evals))
    for split, rows in splits:
        arrays[f"{split}__rows"] = np.array(len(rows))
        for key in rows[0] if rows else ():
            if key == "position_ids":  # rebuilt from seq_lens on reading
                continue
            if isinstance(rows[0][key], str):
                arrays[f"{split}__{key}__text"] = np.array([r[key] for r in rows], dtype=np.str_)
            elif isinstance(rows[0][key], list):
                arrays[f"{split}__{key}__lens"] = np.array([len(r.get(key, ())) for r in rows], dtype=np.int64)
                arrays[f"{split}__{key}"] = np.fromiter((t for r in rows for t in r.get(key, ())), dtype=np.int64)
            else:
                arrays[f"{split}__{key}__value"] = np.array([r[key] for r in rows], dtype=np.int64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
                np.savez(f, **arrays)

        atomic_write(path, write)
    except OSError as e:  # a read-only or full disk costs the next run time, not this one
        logger.warning("Could not write the dataset cache %s (%s); the next run will tokenize again.", path, e)


def _read_cache(path: Path) -> tuple[list[dict], EvalSets] | None:
    start = time.perf_counter()
    try:
        with np.load(path, allow_pickle=False) as z:
            train = _rows_from(z, "train")
            evals: EvalSets = _rows_from(z, "eval") if "eval__rows" in z else None
            if "eval_names" in z:
                evals = {name: _rows_from(z, f"eval{i}") for i, name in enumerate(json.loads(str(z["eval_names"])))}
            report = DataReport.from_dict(json.loads(str(z["report"])))
    except Exception as e:  # noqa: BLE001 -- any unreadable cache is simply rebuilt
        logger.warning("Ignoring unreadable dataset cache %s (%s); tokenizing again.", path, e)
        return None
    n_eval = sum(map(len, evals.values())) if isinstance(evals, dict) else len(evals or ())
    report.log("Loaded %d train / %d eval examples from cache %s in %.2f s (overwrite_cache=True rebuilds it).",
               len(train), n_eval, path, time.perf_counter() - start)
    return train, evals


def _rows_from(z: Any, split: str) -> list[dict]:
    n = int(z[f"{split}__rows"])
    rows: list[dict] = [{} for _ in range(n)]
    prefix = f"{split}__"
    for name in z.files:
        if not name.startswith(prefix) or name == f"{split}__rows" or name.endswith("__lens"):
            continue
        key = name[len(prefix):]
        if key.endswith("__text"):
            for row, v in zip(rows, z[name].tolist()):
                row[key.removesuffix("__text")] = v
            continue
        if key.endswith("__value"):
            for row, v in zip(rows, z[name].tolist()):
                row[key.removesuffix("__value")] = v
            continue
        lens = z[f"{name}__lens"]
        for row, length, part in zip(rows, lens.tolist(), np.split(z[name], np.cumsum(lens)[:-1])):
            if key != "seq_lens" or length:
                row[key] = part.tolist()
    for row in rows:
        if "seq_lens" in row:
            row["position_ids"] = [p for m in row["seq_lens"] for p in range(m)]
    return rows
