"""Merge an adapter into its base model and write a plain transformers folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.atomic import atomic_dir
from ..tuned import TunedModel


def export_merged(
    model_name_or_path: str,
    adapter_dir: str | None,
    export_dir: str | os.PathLike,
    *,
    export_size: int = 5,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write base + merged adapter to `export_dir` (safetensors sharded at `export_size` GB, tokenizer, generation
    config), through a temporary folder so an interrupted export leaves nothing half-written."""
    from ..models import load_model_and_tokenizer, parse_dtype

    out = Path(export_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export_dir '{out}' is not empty; choose another folder or set overwrite_output_dir: true.")
    # Merge in float32 so the rounding happens once, when the merged weights are cast to the export dtype.
    model, tokenizer = load_model_and_tokenizer(model_name_or_path, dtype="float32", trust_remote_code=trust_remote_code)
    if adapter_dir:
        model = TunedModel.load(model, adapter_dir).merge_and_unload()
    if dtype not in (None, "auto"):  # "auto" keeps the float32 the merge was done in
        model = model.to(parse_dtype(dtype))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=f"{export_size}GB")
        tokenizer.save_pretrained(tmp)
    return out
