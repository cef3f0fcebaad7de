"""Packing several short examples into one row, and the collator that batches rows (packed or not).

A packed row keeps its examples apart: `position_ids` restart at 0 per example and the collator's 4-D mask is
block-diagonal causal, so no token attends across examples. Since every example's labels[0] is IGNORE_INDEX (see
`templates.encode`), the shifted loss never asks one example's last token to predict the next example's first:
the packed loss equals the unpacked loss.
"""

from __future__ import annotations

import bisect
import json
from typing import Any

import torch

from ..errors import ConfigError
from .templates import IGNORE_INDEX


def pack(examples: list[dict[str, list[int]]], cutoff_len: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing into rows of at most `cutoff_len` tokens; deterministic for a given input."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))  # stable: ties keep order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > cutoff_len:
            raise ConfigError(f"An example has {n} tokens, more than cutoff_len={cutoff_len}; truncate before packing.")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = cutoff_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    rows = []
    for members in bins:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in members:
            ex = examples[i]
            row["input_ids"] += ex["input_ids"]
            row["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])
            row["position_ids"] += list(range(len(ex["input_ids"])))
            row["seq_lens"].append(len(ex["input_ids"]))
        rows.append(row)
    return rows


PACKING_ATTENTION = ("eager", "sdpa")  # take a 4-D additive mask as is


def check_packing_support(model: Any) -> None:
    """Raise ConfigError if the model's attention would ignore or reject the packed 4-D mask.

    Flash-attention kernels take no 4-D mask at all; without it packed examples would attend to each other.
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    if impl not in PACKING_ATTENTION:
        raise ConfigError(
            f"packing: true builds a block-diagonal 4-D attention mask, which attn_implementation='{impl}' does not "
            f"take. Load the model with attn_implementation='sdpa' (or 'eager'), or set packing: false."
        )


class SFTCollator:
    """Lays a list of examples (or packed rows) out as tensors, padded or padding-free.

    With `padding_free=True` every example goes end to end into one row [1, total tokens] with `position_ids`
    restarting per example and `cu_seq_lens_q` marking the starts; the model must run under
    `peftkit.varlen.varlen_attention`, which keeps examples apart. Nothing is padded and no mask is built.

    Otherwise rows are right-padded into input_ids, labels (IGNORE_INDEX on padding) and attention_mask.

    Packed rows (with `seq_lens`) also get `position_ids` and a 4-D additive float `attention_mask`
    [B, 1, L, L] (0 = may attend, dtype-min = may not) that is causal within each example, blocks attention
    across examples and to padding. transformers 5 passes a 4-D mask to the attention kernel unchanged, so it must
    in float32 by default, which sdpa and eager attention accept for any model dtype; `mask_dtype=model.dtype` halves
    its B*L*L size (8 x 4096^2 in bf16 is 256 MiB) and lets sdpa pick its fused kernels. Checked on Llama, Qwen2 and
    GPT-2 (tests/test_packing.py); call `check_packing_support(model)` before training on packed rows.
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None, *,
                 mask_dtype: torch.dtype = torch.float32, padding_free: bool = False) -> None:
        self.padding_free = padding_free
        # Padding is masked out and never labelled, so any id works when the tokenizer defines none.
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_dtype = mask_dtype

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("SFTCollator got an empty batch.")
        out = self._flattened(features) if self.padding_free else self._padded(features)
        # Tensor fields annotate an example's label positions in order (kd's cached teacher top-k): the batch's
        # label positions are its examples' one after another in both layouts, so they concatenate.
        for key, value in features[0].items():
            if isinstance(value, torch.Tensor):
                out[key] = torch.cat([f[key] for f in features])
        return out

    def _padded(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for b, (f, n) in enumerate(zip(features, lengths)):
            input_ids[b, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[b, :n] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if any("seq_lens" in f for f in features):
            out["position_ids"], out["attention_mask"] = self._packed(features, lengths, width)
        return out

    @staticmethod
    def _flattened(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids: list[int] = []
        labels: list[int] = []
        seq_lens: list[int] = []
        for f in features:
            lens = f.get("seq_lens") or [len(f["input_ids"])]
            if sum(lens) != len(f["input_ids"]):
                raise ValueError(f"seq_lens {lens} do not add up to the row's {len(f['input_ids'])} tokens.")
            start = len(input_ids)
            input_ids += f["input_ids"]
            labels += f["labels"]
            for n in lens:  # an example's first token is never a target: it would be predicted from the previous one
                labels[start] = IGNORE_INDEX
                start += n
            seq_lens += lens
        lens_t = torch.as_tensor(seq_lens)
        return {
            "input_ids": torch.as_tensor(input_ids, dtype=torch.long)[None],
            "labels": torch.as_tensor(labels, dtype=torch.long)[None],
            "position_ids": torch.cat([torch.arange(n) for n in seq_lens])[None],
            "cu_seq_lens_q": torch.cat([torch.zeros(1, dtype=torch.int32), lens_t.cumsum(0).to(torch.int32)]),
        }

    def _packed(self, features, lengths, width) -> tuple[torch.Tensor, torch.Tensor]:
        batch = len(features)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        segment = torch.zeros((batch, width), dtype=torch.long)  # 1, 2, ... per example; 0 on padding
        for b, (f, n) in enumerate(zip(features, lengths)):
            seq_lens = f.get("seq_lens") or [n]
            if sum(seq_lens) != n:
                raise ValueError(f"seq_lens {seq_lens} do not add up to the row's {n} tokens.")
            position_ids[b, :n] = torch.cat([torch.arange(s) for s in seq_lens])
            segment[b, :n] = torch.repeat_interleave(torch.arange(1, len(seq_lens) + 1), torch.as_tensor(seq_lens))
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = same & causal & (segment != 0)[:, None, :]
        mask = torch.zeros((batch, 1, width, width), dtype=self.mask_dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.mask_dtype).min)
        return position_ids, mask


class PairCollator:
    """Preference pairs -> one batch of sequences: every pair's chosen sequence, then every rejected one, laid out
    by `SFTCollator` (padding-free or padded), so one forward scores both sides."""

    def __init__(self, pad_token_id: int | None, *, mask_dtype: torch.dtype = torch.float32,
                 padding_free: bool = False) -> None:
        self.sequences = SFTCollator(pad_token_id, mask_dtype=mask_dtype, padding_free=padding_free)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.sequences([{"input_ids": f["chosen_ids"], "labels": f["chosen_labels"]} for f in features]
                              + [{"input_ids": f["rejected_ids"], "labels": f["rejected_labels"]} for f in features])


class KtoCollator:
    """KTO examples -> the examples, then their mismatched pairs (for the KL reference point), plus `kto_tag`."""

    def __init__(self, pad_token_id: int | None, *, mask_dtype: torch.dtype = torch.float32,
                 padding_free: bool = False) -> None:
        self.sequences = SFTCollator(pad_token_id, mask_dtype=mask_dtype, padding_free=padding_free)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.sequences([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
                               + [{"input_ids": f["kl_ids"], "labels": f["kl_labels"]} for f in features])
        batch["kto_tag"] = torch.tensor([int(f["kto_tag"]) for f in features], dtype=torch.long)
        return batch


class PromptCollator:
    """RL prompts -> {"prompt_ids": [ids per prompt], "columns": [row per prompt]}: the stage generates from them (no
    tensors yet); `sequences` lays its samples (prompt + completion) out as training batches."""

    def __init__(self, pad_token_id: int | None, *, mask_dtype: torch.dtype = torch.float32,
                 padding_free: bool = False) -> None:
        self.sequences = SFTCollator(pad_token_id, mask_dtype=mask_dtype, padding_free=padding_free)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return {"prompt_ids": [list(f["prompt_ids"]) for f in features],
                "columns": [json.loads(f["columns"]) if isinstance(f["columns"], str) else dict(f["columns"])
                            for f in features]}


def collator_for(kind: str, pad_token_id: int | None, *, mask_dtype: torch.dtype = torch.float32,
                 padding_free: bool = False) -> Any:
    """The collator of a stage's kind of examples (formats.KINDS)."""
    cls = {"pairs": PairCollator, "kto": KtoCollator, "prompts": PromptCollator}.get(kind, SFTCollator)
    return cls(pad_token_id, mask_dtype=mask_dtype, padding_free=padding_free)
