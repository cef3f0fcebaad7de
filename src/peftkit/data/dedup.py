"""Exact and near-duplicate rows, and `peftkit data dedup`: the dataset written again without them.

Exact duplicates are conversations whose turns are identical once whitespace runs are collapsed. Near duplicates are
found with MinHash + LSH (datasketch, Broder 1997): each conversation's shingles are its 3-token windows, where a
token is a lower-cased word, or one character of CJK text (Chinese and Japanese write no spaces, so their shingles
are character 3-grams). A row is a near duplicate when its estimated Jaccard similarity to an earlier kept row is at
least the threshold. The first row of each group is kept; seeded hashing makes every run agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .dataset import DataReport, read_conversations
from .formats import Conversation, detect_format
from .sources import DatasetAttr, load_registry, read_rows, resolve_datasets, write_dataset

NEAR = 0.85  # the default Jaccard threshold of a near duplicate
SHINGLE = 3  # tokens per shingle
NUM_PERM = 128  # MinHash permutations: the estimate's standard error is about 0.03 at J = 0.85
SEED = 1
SHOWN_PAIRS = 3
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and Han ideographs: no spaces between words
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


@dataclasses.dataclass
class Duplicates:
    """Which rows repeat an earlier one: row -> the earlier row it repeats (near: and the estimated Jaccard)."""

    exact: dict[int, int] = dataclasses.field(default_factory=dict)
    near: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> set[int]:
        return set(self.exact) | set(self.near)


def dataset_conversations(attr: DatasetAttr, report: DataReport) -> list[Conversation]:
    """Every row of one dataset's files as a conversation (`num_samples` ignored: reports describe the files)."""
    return read_conversations([dataclasses.replace(attr, num_samples=None)], None, 0, report)


def exact_key(conv: Conversation) -> str:
    turns = [(m["role"], " ".join(m["content"].split())) for m in conv.messages]
    return hashlib.sha1(json.dumps([turns, conv.tools], ensure_ascii=False).encode()).hexdigest()


def words(text: str) -> list[str]:
    """Runs of letters and digits, each CJK character a word of its own (those scripts write no spaces)."""
    return _TOKEN.findall(text)


def shingles(conv: Conversation) -> set[bytes]:
    """The conversation's 3-token shingles, system prompt left out: many datasets share one, which would make every
    row look alike. Text shorter than a shingle is one shingle."""
    tokens = words(" ".join(m["content"] for m in conv.messages if m["role"] != "system").lower())
    size = min(SHINGLE, len(tokens))
    return {" ".join(tokens[i:i + size]).encode() for i in range(len(tokens) - size + 1)} if tokens else set()


def find_duplicates(conversations: list[Conversation], near: float | None = NEAR) -> Duplicates:
    """Exact duplicates, then (unless `near` is None) near duplicates among the rest, keyed by `conv.row`."""
    if near is not None and not 0 < near <= 1:
        raise ConfigError(f"The near-duplicate threshold must be in (0, 1], got {near}; 0.85 is a common choice.")
    found, first = Duplicates(), {}
    for conv in conversations:
        key = exact_key(conv)
        if key in first:
            found.exact[conv.row] = first[key]
        else:
            first[key] = conv.row
    if near is None:
        return found
    # scipy, behind datasketch's LSH, adds 0.3 s to every peftkit command; only these commands need it
    from datasketch import MinHash, MinHashLSH

    # LSH only proposes candidates (the estimate below decides); above 0.95 it cannot choose its bands, and a lower
    # candidate threshold only proposes more
    lsh = MinHashLSH(threshold=min(near, 0.95), num_perm=NUM_PERM)
    hashes: dict[int, Any] = {}
    rest = [c for c in conversations if c.row not in found.exact]
    for conv, minhash in zip(rest, MinHash.generator((shingles(c) for c in rest), num_perm=NUM_PERM, seed=SEED)):
        if minhash.is_empty():  # no words at all: nothing to compare
            continue
        scores = [(minhash.jaccard(hashes[j]), -j) for j in lsh.query(minhash)]
        best = max(scores, default=None)
        if best is not None and best[0] >= near:
            found.near[conv.row] = (-best[1], round(float(best[0]), 3))
        else:
            hashes[conv.row] = minhash
            lsh.insert(conv.row, minhash)
    return found


@dataclasses.dataclass
class Deduped:
    """What `dedup_dataset` wrote."""

    path: Path
    entry: dict[str, Any]
    name: str
    rows: int  # rows read
    written: int
    duplicates: Duplicates
    malformed: int  # rows that are no valid conversation, written unchanged


def dedup_dataset(dataset: str, dataset_dir: str | Path, output: str | Path, name: str | None = None,
                  near: float | None = NEAR) -> Deduped:
    """Write the rows of `dataset` (a name or file; several of one format are joined) without exact and near
    duplicates to `output` (.json or .jsonl) in their own format, and add/replace its entry `name` (default: the
    output's stem) in the dataset_info.json beside it. Rows that are no valid conversation are kept as they are:
    dedup removes duplicates only, and `peftkit data stats` reports those rows."""
    output = Path(output)
    if output.suffix.lower() not in (".json", ".jsonl"):
        raise ConfigError(f"The output {output} must be a .json or .jsonl file.")
    attrs = resolve_datasets(dataset, dataset_dir)
    sources = {p.resolve() for a in attrs for p in a.files}
    if output.resolve() in sources:
        raise ConfigError(f"The output {output} is one of the dataset's own files; write to a new file (and replace "
                          "the old one yourself once you have checked it).")
    registry = load_registry(output.parent) or {}  # read first: a broken dataset_info.json stops us before writing
    rows: list[Any] = []
    conversations: list[Conversation] = []
    formats = set()
    report = DataReport()
    for attr in attrs:
        raw = read_rows(attr)
        for conv in dataset_conversations(attr, report):
            conv.row += len(rows)  # rows of all the datasets, numbered on
            conversations.append(conv)
        rows += raw
        formats.add(json.dumps(_format_entry(attr, raw), sort_keys=True))
    if len(formats) > 1:
        raise ConfigError(f"The datasets {dataset} have different formats or columns, so one file cannot hold them; "
                          "dedup them one at a time.")
    found = find_duplicates(conversations, near)
    kept = [r for i, r in enumerate(rows) if i not in found.rows]
    output.parent.mkdir(parents=True, exist_ok=True)
    name = name or output.stem
    entry = write_dataset(output, kept, name, json.loads(formats.pop()), registry)
    return Deduped(output, entry, name, len(rows), len(kept), found, len(rows) - len(conversations))


def _format_entry(attr: DatasetAttr, rows: list[Any]) -> dict[str, Any]:
    """The dataset_info.json keys that say how to read `attr`'s rows (detected, for an unregistered file)."""
    formatting, columns, tags = attr.formatting, attr.columns, attr.tags
    if formatting is None:
        first = next((r for r in rows if isinstance(r, dict)), {})
        formatting, columns, tags = detect_format(first, attr.name)
    entry: dict[str, Any] = {"formatting": formatting} if formatting != "alpaca" else {}
    entry.update({k: v for k, v in (("columns", columns), ("tags", tags)) if v})
    return {**entry, "ranking": True} if attr.ranking else entry
