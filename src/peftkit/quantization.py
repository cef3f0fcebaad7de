"""QLoRA's base model: linear layers stored in 4 bits (NF4 or FP4, optionally double-quantized) or 8 bits (LLM.int8)
by bitsandbytes, loaded through transformers' `BitsAndBytesConfig`.

bitsandbytes does the storage and the matmuls; this module only builds its config, recognises its layers and
measures them. Adapters never write into these weights: merging happens on a full-precision reload (export).
"""

from __future__ import annotations

import dataclasses
import os
import re
from importlib.metadata import version
from importlib.util import find_spec
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError
from .io.run_config import read_train_config

QUANTIZATION_BITS = (4, 8)
QUANTIZATION_TYPES = ("nf4", "fp4")
BNB_MIN_VERSION = (0, 50)  # the first release tested here; CPU 4-bit training needs a recent one
BNB_INSTALL = 'pip install "bitsandbytes>=0.50"'
_QUANTIZED_PARAMS = {"Params4bit": 4, "Int8Params": 8}  # bitsandbytes' weight classes by name: no import needed
# Why a quantized base cannot take merged weights; shared by TunedModel.merge_adapter and export.
MERGE_REFUSAL = (
    "Merging into a {bits}-bit quantized model is not possible: its weights are stored in {bits} bits, and writing "
    "W + BA back would quantize the update away (or change the model unpredictably). Merge on a full-precision base "
    "instead: `peftkit export model_name_or_path=... adapter_name_or_path=... export_dir=...` loads the base in "
    "16/32 bits, merges and saves."
)


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """LLaMA-Factory's `quantization_bit`, `quantization_type` and `double_quantization`."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.bits not in QUANTIZATION_BITS:
            raise ConfigError(f"quantization_bit must be 4 (QLoRA, NF4/FP4) or 8 (LLM.int8), got {self.bits!r}.")
        if self.quant_type not in QUANTIZATION_TYPES:
            raise ConfigError(f"quantization_type must be one of {', '.join(QUANTIZATION_TYPES)}, "
                              f"got {self.quant_type!r}.")

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit (LLM.int8)"
        return f"4-bit {self.quant_type.upper()}" + (" with double quantization" if self.double_quant else "")

    def to_transformers(self, compute_dtype: torch.dtype) -> Any:
        """transformers' BitsAndBytesConfig: NF4/FP4 in blocks of 64 (bitsandbytes' default), absmax constants
        quantized again with `double_quant`; matmuls run in `compute_dtype`."""
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant, bnb_4bit_compute_dtype=compute_dtype)


def trained_quantization(adapter_dir: str | os.PathLike | None) -> QuantizationConfig | None:
    """The quantization a peftkit run trained this adapter against (from its train_config.json), else None."""
    cfg = read_train_config(adapter_dir)
    if cfg.get("quantization_bit") is None:
        return None
    try:
        return QuantizationConfig(cfg["quantization_bit"], cfg.get("quantization_type", "nf4"),
                                  cfg.get("double_quantization", True))
    except ConfigError:
        return None


def require_bitsandbytes() -> None:
    if find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"quantization_bit needs bitsandbytes, which is not installed; install it with: "
                             f"{BNB_INSTALL}")
    found = version("bitsandbytes")
    if tuple(int(part) for part in re.findall(r"\d+", found)[:2]) < BNB_MIN_VERSION:
        raise ModelLoadError(f"quantization_bit needs bitsandbytes >= {'.'.join(map(str, BNB_MIN_VERSION))}, found "
                             f"{found}; upgrade it with: {BNB_INSTALL.replace('install', 'install -U', 1)}")


def is_quantized_param(p: torch.Tensor | None) -> bool:
    return type(p).__name__ in _QUANTIZED_PARAMS


def quantized_bits(model: nn.Module) -> int | None:
    """4 or 8 if `model` holds bitsandbytes-quantized weights, else None."""
    return next((_QUANTIZED_PARAMS[type(p).__name__] for p in model.parameters() if is_quantized_param(p)), None)


def logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte, so its numel is not the count."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """A quantized linear's weight as a float [out, in] tensor (DoRA's norms need it); others as they are."""
    w = linear.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state)
    if type(w).__name__ == "Int8Params":
        scale = w.SCB if getattr(w, "SCB", None) is not None else linear.state.SCB  # bitsandbytes moved it
        return w.data.float() * (scale.float().unsqueeze(1) / 127)
    return w


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors in a bitsandbytes quantization state: absmax, codebook, and the nested state of double
    quantization."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor) or type(value).__name__ == "QuantState":
                yield from _tensors(value, depth + 1)


def _quantization_state(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a quantized linear keeps beside its packed weight (absmax, codebooks, int8 row scales)."""
    w = module.weight
    state = getattr(module, "state", None)  # LLM.int8 keeps its row scales on the layer's matmul state
    found = [*_tensors(getattr(w, "quant_state", None)), getattr(w, "SCB", None), getattr(state, "SCB", None)]
    return [t for t in found if t is not None]


def _unique_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantized_storage(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the quantized weights, quantization constants included; each tensor counted once."""
    seen: set[int] = set()
    params = nbytes = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and is_quantized_param(w):
            params += logical_numel(w)
            nbytes += _unique_bytes([w, *_quantization_state(module)], seen)
    return params, nbytes


def model_bytes(model: nn.Module) -> int:
    """Bytes held by a model's tensors (parameters, buffers, quantization constants), each counted once: what the
    weights cost in memory, before activations and optimizer state."""
    seen: set[int] = set()
    quantized = [t for m in model.modules() if is_quantized_param(getattr(m, "weight", None))
                 for t in _quantization_state(m)]
    return _unique_bytes([*model.parameters(), *model.buffers(), *quantized], seen)


def settle_after_loading(model: nn.Module) -> None:
    """Give the non-quantized tensors memory of their own, with 1-D ones (norm weights, biases of unquantized layers)
    in float32.

    transformers leaves them as views into the memory-mapped checkpoint, whose every page bitsandbytes read while
    quantizing: the whole file would stay resident and cost more than the 4-bit weights save. Norms in float32 as
    QLoRA trains: at bf16 their rounding would add to the 4-bit error; bigger tensors (embeddings) keep the compute
    dtype to keep memory low. A float32 norm weight promotes the norm's output to float32, which a bf16 module after
    it (the output head, Qwen3's attention after its q/k norms) refuses, so each such norm hands its output back in
    the dtype its input came in. bitsandbytes' CPU inference repacking is turned off (see below).
    """
    for module in model.modules():
        promoted = False
        # bitsandbytes casts a quantized linear's bias to its input's dtype in place at the first forward: upcast
        # here, it would silently turn back into the compute dtype mid-training
        quantized = any(is_quantized_param(p) for p in module.parameters(recurse=False))
        for name, p in module.named_parameters(recurse=False):
            if is_quantized_param(p):
                continue
            dtype = torch.float32 if p.dim() == 1 and p.is_floating_point() and not quantized else p.dtype
            promoted |= dtype != p.dtype and "norm" in type(module).__name__.lower()
            p.data = p.data.to(dtype, copy=True)
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                setattr(module, name, b.clone())
        if promoted:
            module.register_forward_hook(_output_in_input_dtype)
        if getattr(module, "support_avx512bf16_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 kernel at the first no-grad eval-mode forward:
            # in place, with the absmax constants rounded to bf16, computing in bf16 whatever the compute dtype, for
            # every later call, training included (that kernel passes no gradient to the layer's input), and failing
            # on layers whose sizes are not multiples of 32 and 64. Training and evaluation must see one weight.
            module.support_avx512bf16_for_cpu = False


def _output_in_input_dtype(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output
