"""`peftkit data stats` and `peftkit data preview`: what a dataset holds before minutes of training find out.

Stats count what training would see: rows skipped (and why), turns, token lengths after the chat template, what
cutoff_len truncates, duplicates (dedup.py) and the writing systems used. Every number comes from the loader and
encoder training uses (`read_conversations`, `encode_counted`), so the report cannot drift from training.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import statistics
import sys
import unicodedata
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError
from .dataset import DataReport, DatasetStats
from .dedup import NEAR, SHOWN_PAIRS, Duplicates, dataset_conversations, find_duplicates, words
from .formats import ANSWER_ROLES, Conversation, RowError
from .sources import resolve_datasets
from .templates import IGNORE_INDEX, Template, encode_counted, get_template

BINS = 10
BAR = 40  # characters of the longest histogram bar
# Trained (label) tokens in a preview: green on a terminal, else between brackets that survive a pipe or a file.
MARKS = {True: ("\033[1;32m", "\033[0m"), False: ("[[", "]]")}
_SCRIPTS = {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana"}
_WIDTH = ("FULLWIDTH", "HALFWIDTH")


@dataclasses.dataclass
class DatasetSummary:
    """One dataset's stats. `stats` holds the row counts training's own report keeps (rows, skips and reasons,
    truncated examples, answer tokens cut); `lengths` the token length of every conversation before truncation."""

    stats: DatasetStats
    cutoff_len: int
    turns: dict[int, int]  # answer turns -> conversations
    lengths: list[int]
    duplicates: Duplicates
    scripts: dict[str, int]  # dominant script of the letters -> conversations

    def tokens(self) -> dict[str, float] | None:
        if not self.lengths:
            return None
        ordered = sorted(self.lengths)
        p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]  # nearest rank: a length some row really has
        return {"min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}

    def histogram(self, bins: int = BINS) -> list[tuple[int, int, int]]:
        """(from, to, conversations) over equal-width bins of token length, both ends included."""
        if not self.lengths:
            return []
        low, high = min(self.lengths), max(self.lengths)
        width = max(1, math.ceil((high - low + 1) / bins))
        counts = collections.Counter((n - low) // width for n in self.lengths)
        return [(low + b * width, low + (b + 1) * width - 1, counts[b]) for b in range(max(counts) + 1)]

    def to_dict(self) -> dict[str, Any]:
        s, d = self.stats, self.duplicates
        return {
            "name": s.name, "rows": s.rows, "conversations": s.loaded, "tokenized": s.tokenized,
            "skipped": s.skipped, "reasons": s.reasons, "first_skips": s.first_skips,
            "turns": {str(t): n for t, n in self.turns.items()},  # JSON's keys are text: to_dict equals its JSON
            "tokens": self.tokens(), "histogram": [{"from": a, "to": b, "rows": n} for a, b, n in self.histogram()],
            "cutoff_len": self.cutoff_len, "truncated": s.truncated, "labels_cut": s.labels_cut,
            "exact_duplicates": len(d.exact), "near_duplicates": len(d.near),
            "exact_pairs": [[row, first] for row, first in d.exact.items()],
            "near_pairs": [[row, first, score] for row, (first, score) in d.near.items()],
            "scripts": self.scripts,
        }

    def render(self) -> str:
        s, d = self.stats, self.duplicates
        lines = [f"{s.name}: {s.rows} rows, {s.loaded} conversations, {s.skipped} skipped"]
        lines += [f"  skipped {n}x: {reason}" for reason, n in collections.Counter(s.reasons).most_common()]
        lines.append("  answer turns: " + ", ".join(f"{t}: {n}" for t, n in self.turns.items()))
        tokens = self.tokens()
        if tokens:
            lines.append("  tokens: " + ", ".join(f"{k} {str(v).removesuffix('.0')}" for k, v in tokens.items()))
            hist = self.histogram()
            top = max(n for _, _, n in hist)
            digits = len(str(hist[-1][1]))
            lines += [f"  {a:>{digits}}-{b:<{digits}} {'#' * math.ceil(BAR * n / top):<{BAR}} {n}" for a, b, n in hist]
        lines.append(f"  over cutoff_len {self.cutoff_len}: {s.truncated} truncated, {s.labels_cut} answer tokens "
                     "dropped")
        exact = ", ".join(f"row {r} = row {f}" for r, f in itertools.islice(d.exact.items(), SHOWN_PAIRS))
        near = ", ".join(f"row {r} ~ row {f} ({j:.2f})" for r, (f, j) in itertools.islice(d.near.items(),
                                                                                          SHOWN_PAIRS))
        lines.append(f"  exact duplicates: {len(d.exact)}" + (f" (e.g. {exact})" if exact else ""))
        lines.append(f"  near duplicates: {len(d.near)}" + (f" (e.g. {near})" if near else ""))
        lines.append("  scripts: " + ", ".join(f"{k} {n}" for k, n in self.scripts.items()))
        return "\n".join(lines)


@dataclasses.dataclass
class StatsReport:
    """`dataset_stats`' result, one summary per dataset."""

    datasets: list[DatasetSummary]
    near: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"near": self.near, "datasets": [d.to_dict() for d in self.datasets]}

    def render(self) -> str:
        return "\n\n".join(d.render() for d in self.datasets)


def dataset_stats(tokenizer: Any, dataset: list[str] | str, dataset_dir: str | Path, *, template: str | None = None,
                  cutoff_len: int = 2048, near: float | None = NEAR) -> StatsReport:
    """Stats of each dataset (dataset_info.json names or files), tokenized as SFT training would tokenize them."""
    _check_cutoff(cutoff_len)
    chat = get_template(template, tokenizer)
    report, summaries = DataReport(), []
    for attr in resolve_datasets(dataset, dataset_dir):
        conversations = dataset_conversations(attr, report)
        stats = report.datasets[attr.name]
        lengths = _lengths(conversations, chat, tokenizer, cutoff_len, stats)
        turns = collections.Counter(sum(m["role"] in ANSWER_ROLES for m in c.messages) for c in conversations)
        scripts = collections.Counter(dominant_script(_text(c)) for c in conversations)
        summaries.append(DatasetSummary(stats, cutoff_len, dict(sorted(turns.items())), lengths,
                                        find_duplicates(conversations, near), dict(scripts.most_common())))
    return StatsReport(summaries, near)


def _check_cutoff(cutoff_len: int) -> None:
    if cutoff_len < 2:
        raise ConfigError(f"--cutoff-len must be at least 2 tokens, got {cutoff_len}.")


def _lengths(conversations: list[Conversation], chat: Template, tokenizer: Any, cutoff_len: int,
             stats: DatasetStats) -> list[int]:
    """Each conversation's full length; over cutoff_len, encoded again as training encodes it, to count the answer
    tokens its truncation drops (or to skip it, as training would, when no answer token fits)."""
    lengths = []
    for conv in tqdm(conversations, desc=f"Tokenizing {stats.name}", unit="conv", mininterval=1.0):
        try:
            example, _, _ = encode_counted(conv, chat, tokenizer, cutoff_len=sys.maxsize)
            lengths.append(len(example["input_ids"]))
            if lengths[-1] > cutoff_len:
                _, _, labels_cut = encode_counted(conv, chat, tokenizer, cutoff_len=cutoff_len)
                stats.truncated += 1
                stats.labels_cut += labels_cut
        except RowError as e:
            stats.skip(conv.row, str(e))
            continue
        stats.tokenized += 1
    return lengths


def _text(conv: Conversation) -> str:
    return " ".join(m["content"] for m in conv.messages)


@functools.lru_cache(maxsize=4096)
def _script(ch: str) -> str:
    words = [w for w in unicodedata.name(ch, "UNKNOWN").split() if w not in _WIDTH]
    return _SCRIPTS.get(words[0], words[0].title())


def dominant_script(text: str) -> str:
    """The Unicode script most of the text's words are written in (from their first letter's character name: Latin,
    Han, Kana, Hangul, Cyrillic, Arabic, Devanagari, ...), a cheap language signal; "none" for text without letters.
    Words, not letters, are counted, each CJK character one word: a Chinese answer quoting English terms is Han."""
    counts = collections.Counter(_script(next(ch for ch in w if ch.isalpha())) for w in words(text)
                                 if any(ch.isalpha() for ch in w))
    return counts.most_common(1)[0][0] if counts else "none"


def preview(tokenizer: Any, dataset: list[str] | str, dataset_dir: str | Path, *, template: str | None = None,
            cutoff_len: int = 2048, n: int = 3, color: bool = False) -> list[str]:
    """The first `n` conversations of each dataset as training sees them: rendered by the template, cut to
    cutoff_len, with the trained (label) tokens marked (`MARKS`: colour on a terminal, `[[...]]` otherwise)."""
    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}.")
    _check_cutoff(cutoff_len)
    chat = get_template(template, tokenizer)
    shown = []
    for attr in resolve_datasets(dataset, dataset_dir):
        for conv in dataset_conversations(attr, DataReport())[:n]:
            head = f"--- {attr.name}, row {conv.row}"
            try:
                example, truncated, labels_cut = encode_counted(conv, chat, tokenizer, cutoff_len=cutoff_len)
            except RowError as e:
                shown.append(f"{head}: skipped by training ({e})")
                continue
            trained = sum(label != IGNORE_INDEX for label in example["labels"])
            cut = f", truncated to cutoff_len ({labels_cut} answer tokens dropped)" if truncated else ""
            shown.append(f"{head}: {len(example['input_ids'])} tokens, {trained} trained{cut}\n"
                         + mark_labels(example, tokenizer, color))
    return shown


def mark_labels(example: dict[str, list[int]], tokenizer: Any, color: bool = False) -> str:
    """The example's text with each run of trained tokens wrapped in `MARKS[color]`."""
    start, end = MARKS[color]
    parts = []
    pairs = zip(example["input_ids"], example["labels"])
    for trained, run in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([t for t, _ in run], skip_special_tokens=False)
        parts.append(f"{start}{text}{end}" if trained else text)
    return "".join(parts)
