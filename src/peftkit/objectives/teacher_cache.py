"""`kd_cache_teacher`: the teacher's top-k log-probabilities at every label position of every example, computed in one
pass before training and kept in the dataset cache folder, so no epoch and no rerun runs the teacher again.

What is stored, per label position: the teacher's k most likely ids (int32) and their log-probabilities under its
full softmax at T = 1, in float16 (11 significant bits: an error of at most 2^-11 relative, about 0.01 at a
log-probability of -20). Renormalising over the k ids at any temperature gives what the teacher's own logits give
(the log-partition is a constant that cancels), so one cache serves every `kd_temperature`.

The key covers everything that changes the numbers: the teacher (its path, and its files' sizes and times), its
adapter, its dtype and quantization, k, and the tokenized examples with their label positions as the run lays them
out. Examples carry their slice as tensor fields, which the collator concatenates into the batch in label order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.templates import IGNORE_INDEX
from ..io.atomic import atomic_write
from .base import Batch

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what is stored, or how it is keyed, changes
IDS, LOGPS = "teacher_ids", "teacher_logps"  # the batch fields kd reads instead of running the teacher
STORED_DTYPE = torch.float16


def _describe(path: str | None) -> list[Any]:
    """A model or adapter as the key sees it: a local folder or file by its files' names, sizes and times."""
    if not path:
        return [None]
    p = Path(path).expanduser()
    if not p.exists():  # an alias or a hub id: the name says it
        return [path]
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [str(p.resolve())] + [[str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size,
                                  f.stat().st_mtime_ns] for f in files]


def label_counts(rows: list[dict], collate: Callable[[list[dict]], Batch]) -> list[int]:
    """How many label positions each example has as the run's collator lays it out (padding-free layouts never
    train an example's first token)."""
    return [int((collate([row])["labels"][:, 1:] != IGNORE_INDEX).sum()) for row in rows]


def cache_key(teacher: str, adapter: str | None, quantization_bit: int | None, dtype: torch.dtype, top_k: int,
              rows: list[dict], counts: list[int]) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT, _describe(teacher), _describe(adapter), quantization_bit, str(dtype),
                                        top_k, counts], default=str).encode())
    for row in rows:
        for key in ("input_ids", "labels", "seq_lens"):
            digest.update(np.asarray(row.get(key, ()), dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:24]


def _read(path: Path, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.exists():
        return None
    try:
        stored = load_file(str(path))
        if stored["counts"].tolist() != counts:
            raise ValueError("its examples' label counts differ")
        return stored["ids"], stored["logps"]
    except Exception as e:  # noqa: BLE001 -- an unreadable cache is simply recomputed
        logger.warning("Ignoring the teacher cache %s (%s); running the teacher again.", path, e)
        return None


def annotate(rows: list[dict], collate: Callable[[list[dict]], Batch],
             teacher_topk: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]], path: Path, counts: list[int],
             batch_size: int) -> list[dict]:
    """`rows` with each example's slice of the teacher's top-k ids and log-probs (IDS, LOGPS), read from `path` or
    computed with `teacher_topk` (ids and log-probs of a batch's label positions, in order) and written there."""
    stored = _read(path, counts)
    if stored is None:
        ids, logps = [], []
        for start in tqdm(range(0, len(rows), batch_size), desc="teacher top-k", unit="batch", dynamic_ncols=True):
            batch_ids, batch_logps = teacher_topk(collate(rows[start:start + batch_size]))
            ids.append(batch_ids.to("cpu", torch.int32))
            logps.append(batch_logps.to("cpu", STORED_DTYPE))
        stored = torch.cat(ids), torch.cat(logps)
        if len(stored[0]) != sum(counts):
            raise RuntimeError(f"The teacher gave {len(stored[0])} label positions for {sum(counts)}.")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {"ids": stored[0], "logps": stored[1], "counts": torch.tensor(counts, dtype=torch.int64)}
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": str(FORMAT)}))
        except OSError as e:  # a read-only or full disk costs the next run time, not this one
            logger.warning("Could not write the teacher cache %s (%s); the next run computes it again.", path, e)
    ids, logps = stored
    out, start = [], 0
    for row, n in zip(rows, counts):
        out.append({**row, IDS: ids[start:start + n], LOGPS: logps[start:start + n]})
        start += n
    return out
