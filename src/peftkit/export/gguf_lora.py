"""A LoRA adapter as llama.cpp's LoRA GGUF: a small file that llama.cpp applies to a base GGUF without merging.

llama.cpp computes W x + (alpha / r) * B (A x) per tensor, with one `adapter.lora.alpha` for the file and r read off
each B. Writing alpha = scaling * r therefore reproduces any LoRA scaling, rsLoRA's alpha / sqrt(r) included. The
tensors take the base tensor's GGUF name plus `.lora_a` / `.lora_b`; B's rows get the same q/k permutation as the
base weight's rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf

from ..errors import ExportError
from ..io import peft_format
from ..methods.lora import LoraConfig
from .gguf import TensorNames, new_writer, write_tensors

LORA_GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def write_gguf_lora(base_config: Any, adapter_dir: str | os.PathLike, path: str | os.PathLike, *,
                    gguf_type: str = "f16", progress: bool = True) -> Path:
    """Write the LoRA adapter in `adapter_dir` (PEFT format) for the base model described by `base_config`."""
    if gguf_type not in LORA_GGUF_TYPES:
        raise ExportError(f"A GGUF LoRA adapter can be written as {', '.join(LORA_GGUF_TYPES)}, not '{gguf_type}'.")
    config = peft_format.read_config(adapter_dir)
    _check_exportable(config, adapter_dir)
    names = TensorNames(base_config)
    state = {peft_format.internal_key(k, "LORA"): t for k, t in peft_format.read_weights(adapter_dir).items()}
    modules = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".lora_A", ".lora_B"))})
    other = sorted(k for k in state if not k.endswith((".lora_A", ".lora_B")))
    if other:
        raise ExportError(f"The adapter holds tensors that are not LoRA A/B matrices (e.g. '{other[0]}': a trained "
                          "bias, embedding LoRA or modules_to_save), which llama.cpp's LoRA format cannot carry. "
                          "Merge it instead (export_format: gguf).")
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    tensors = []
    for module in modules:
        if tied and module.endswith("lm_head"):
            raise ExportError("The adapter trains lm_head, which this model ties to its embeddings; llama.cpp's base "
                              "GGUF has no separate output tensor for it. Merge it instead (export_format: gguf).")
        base = names.gguf_name(f"{module}.weight")
        a, b = state[f"{module}.lora_A"], state[f"{module}.lora_B"]
        tensors.append((f"{base}.lora_a", a, lambda t: t.contiguous()))
        tensors.append((f"{base}.lora_b", b, lambda t, n=base: names.to_gguf_layout(n, t, rows_only=True)))

    writer = new_writer(names.arch, gguf.GGUFType.ADAPTER, Path(path).stem)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.scaling * config.r))
    return write_tensors(writer, tensors, path, gguf_type, progress=progress)


def _check_exportable(config: Any, adapter_dir: str | os.PathLike) -> None:
    if not isinstance(config, LoraConfig):  # LoRA+, LoRA-drop and rsLoRA adapters are plain LoRA at inference
        kind = type(config).__name__.removesuffix("Config")
        raise ExportError(f"'{adapter_dir}' is a {kind} adapter; llama.cpp's LoRA GGUF holds plain LoRA adapters "
                          "only. Merge it into the base instead (export_format: gguf).")
    if config.use_dora:
        raise ExportError("DoRA rescales each merged weight by a learned magnitude, which llama.cpp's LoRA format "
                          "cannot express. Merge it instead (export_format: gguf).")
