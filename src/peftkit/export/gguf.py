"""Write a transformers model as one GGUF file that llama.cpp (and so Ollama) runs.

The file is laid out the way llama.cpp's own converter lays it out: its tensor names (the `gguf` package's
`TensorNameMap`), its hyperparameter keys, the tokenizer (`gguf_vocab`), and its weight layout. Three layout facts
matter for correctness: llama.cpp's "normal" rotary embedding rotates adjacent pairs of dimensions while transformers'
Llama rotates the two halves of each head, so Llama's q/k rows are permuted (every other architecture here uses
llama.cpp's "neox" rope, which rotates halves too); GPT-2 stores its linears as Conv1D (in, out), so they are
transposed; Gemma's RMSNorms multiply by (1 + weight), llama.cpp's by the weight, so Gemma's norms are stored plus
one. Settings llama.cpp fixes per architecture instead of reading them (Gemma's query scale, layer pattern and
soft-caps) are checked, and a model that differs is refused rather than exported to compute something else.
Tensors are converted and written one at a time, so an export needs the model's memory plus one tensor, not a second
copy of the model.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ExportError
from ..io.atomic import atomic_write
from .gguf_vocab import add_tokenizer

logger = logging.getLogger("peftkit.export")
T = gguf.GGMLQuantizationType
GGUF_TYPES: dict[str, tuple[T, gguf.LlamaFileType]] = {
    "f32": (T.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # llama.cpp's gelu is the tanh form


@dataclass(frozen=True)
class GgufArch:
    """How one transformers architecture maps onto llama.cpp's."""

    arch: gguf.MODEL_ARCH
    write_hparams: Callable[[gguf.GGUFWriter, Any], None]
    permute_qk: bool = False  # llama.cpp's normal rope pairs adjacent dimensions; HF Llama rotates halves
    conv1d: bool = False  # weights stored (in, out), as GPT-2's Conv1D does
    activations: tuple[str, ...] = ("silu",)
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight), llama.cpp's by the stored weight

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _rope(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters` (per layer type for Gemma 3); older configs in
    rope_theta / rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params = dict(params.get(layer_type) or params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attention_hparams(w: gguf.GGUFWriter, c: Any, rope_dims: int | None = None) -> None:
    """The sizes every decoder-only transformer writes; head_dim goes in as key/value length, since it need not be
    hidden / heads (Gemma, Qwen3)."""
    head_dim = _head_dim(c)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads or c.num_attention_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(rope_dims or head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)


def _rope_hparams(w: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):  # llama3's scaling is a tensor, see _rope_tensors
        raise ExportError(f"rope type '{rope['rope_type']}' is not supported in GGUF export yet; supported: default, "
                          "linear, llama3. Export export_format: hf and convert with llama.cpp's "
                          "convert_hf_to_gguf.py.")


def _warn_if_sliding(w: gguf.GGUFWriter, c: Any) -> None:
    """For graphs without sliding-window attention (llama, qwen2/3, phi3: llama.cpp disables Phi-3's window)."""
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    if window and window < c.max_position_embeddings:
        logger.warning("%s attends within a sliding window of %d tokens, which llama.cpp's %s graph does not: "
                       "outputs agree up to %d tokens of context and differ beyond.", c.model_type, window,
                       w.arch, window)


def _llama_hparams(w: gguf.GGUFWriter, c: Any) -> None:
    _attention_hparams(w, c)
    _rope_hparams(w, _rope(c))
    _warn_if_sliding(w, c)


def _phi3_hparams(w: gguf.GGUFWriter, c: Any) -> None:
    """Phi-3 / Phi-4-mini rotate only the first `partial_rotary_factor` of each head; their long-context variants
    scale rope by LongRoPE (factor tensors in `_rope_tensors`, plus one attention factor)."""
    rope = _rope(c)
    fraction = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    _attention_hparams(w, c, rope_dims=int(_head_dim(c) * fraction))
    if rope["rope_type"] == "longrope":
        original = rope["original_max_position_embeddings"]
        w.add_rope_freq_base(float(rope["rope_theta"]))
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(_longrope_attention_factor(c, rope))
        logger.warning("LongRoPE: transformers switches to the long-context factors when a sequence passes %d "
                       "tokens; llama.cpp switches when its context size (n_ctx) does, for every sequence. Run the "
                       "GGUF with n_ctx <= %d for the short-context behaviour.", original, original)
    else:
        _rope_hparams(w, rope)
    _warn_if_sliding(w, c)


def _longrope_attention_factor(c: Any, rope: dict[str, Any]) -> float:
    """The cos/sin scale LongRoPE applies at every length (transformers' `_compute_longrope_parameters`)."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or c.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _gemma_hparams(w: gguf.GGUFWriter, c: Any) -> None:
    """Gemma's embedding scale (sqrt(hidden)) and gelu are built into llama.cpp's graph; its norms are shifted
    by `norm_offset`."""
    _attention_hparams(w, c)
    _rope_hparams(w, _rope(c))


def _gemma_query_scale(c: Any, n_layers_27b: int) -> None:
    """llama.cpp does not read Gemma's query_pre_attn_scalar: it scales queries by 1/sqrt(head_dim), except for the
    27B models (recognised by their layer count), where it uses hidden / heads."""
    expected = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == n_layers_27b else _head_dim(c)
    if float(c.query_pre_attn_scalar) != float(expected):
        raise ExportError(f"This {c.model_type} model scales attention by query_pre_attn_scalar="
                          f"{c.query_pre_attn_scalar}, but llama.cpp's graph uses {expected} for this shape, so the "
                          "GGUF would compute different attention. Export with export_format: hf instead.")


def _gemma_sliding_window(w: gguf.GGUFWriter, c: Any, period: int) -> None:
    """llama.cpp hard-codes Gemma's layer pattern: the last layer of every `period` attends fully, the others
    within the sliding window."""
    expected = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(c.num_hidden_layers)]
    layer_types = list(getattr(c, "layer_types", None) or expected)
    if not c.sliding_window or layer_types != expected:
        raise ExportError(f"llama.cpp's {w.arch} graph attends fully on the last layer of every {period} and within a "
                          f"sliding window on the others; this model's layer_types ({layer_types}) or sliding_window "
                          f"({c.sliding_window}) differ. Export with export_format: hf instead.")
    w.add_sliding_window(c.sliding_window)


def _gemma2_hparams(w: gguf.GGUFWriter, c: Any) -> None:
    _gemma_hparams(w, c)
    _gemma_query_scale(c, n_layers_27b=46)
    _gemma_sliding_window(w, c, period=2)
    if c.attn_logit_softcapping is None or c.final_logit_softcapping is None:  # llama.cpp would cap at 50 and 30
        raise ExportError("llama.cpp's gemma2 graph always soft-caps attention and final logits; this model leaves "
                          "attn_logit_softcapping or final_logit_softcapping unset. Export with export_format: hf "
                          "instead.")
    w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    w.add_final_logit_softcapping(c.final_logit_softcapping)


def _gemma3_hparams(w: gguf.GGUFWriter, c: Any) -> None:
    """Gemma 3: global layers use rope_parameters["full_attention"], sliding ones ["sliding_attention"]."""
    _attention_hparams(w, c)
    _rope_hparams(w, _rope(c, "full_attention"))
    local = _rope(c, "sliding_attention")
    if local["rope_type"] != "default":
        raise ExportError(f"llama.cpp's gemma3 graph rotates sliding-window layers with plain rope; this model uses "
                          f"'{local['rope_type']}' there. Export with export_format: hf instead.")
    w.add_rope_freq_base_swa(float(local["rope_theta"]))  # older llama.cpp ignores it: 10000, as in every Gemma 3
    _gemma_query_scale(c, n_layers_27b=62)
    _gemma_sliding_window(w, c, period=6)
    if c.attn_logit_softcapping or c.final_logit_softcapping:
        raise ExportError("llama.cpp's gemma3 graph does not soft-cap logits; this model sets attn_logit_softcapping "
                          "or final_logit_softcapping. Export with export_format: hf instead.")


def _gpt2_hparams(w: gguf.GGUFWriter, c: Any) -> None:
    w.add_context_length(c.n_positions)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    w.add_vocab_size(c.vocab_size)


_LLAMA = GgufArch(gguf.MODEL_ARCH.LLAMA, _llama_hparams, permute_qk=True)
# Every architecture but llama uses llama.cpp's neox rope, which rotates halves as transformers does: no permutation.
ARCHITECTURES: dict[str, GgufArch] = {
    "llama": _LLAMA,  # SmolLM2 included
    "mistral": _LLAMA,  # llama.cpp runs Mistral as llama
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2, _llama_hparams),
    "qwen3": GgufArch(gguf.MODEL_ARCH.QWEN3, _llama_hparams),  # adds per-head q/k RMSNorms, mapped by name
    "gemma": GgufArch(gguf.MODEL_ARCH.GEMMA, _gemma_hparams, activations=_TANH_GELU, norm_offset=1.0),
    "gemma2": GgufArch(gguf.MODEL_ARCH.GEMMA2, _gemma2_hparams, activations=_TANH_GELU, norm_offset=1.0),
    "gemma3_text": GgufArch(gguf.MODEL_ARCH.GEMMA3, _gemma3_hparams, activations=_TANH_GELU, norm_offset=1.0),
    "phi3": GgufArch(gguf.MODEL_ARCH.PHI3, _phi3_hparams),  # fused qkv and [gate; up] are llama.cpp's layout too
    "gpt2": GgufArch(gguf.MODEL_ARCH.GPT2, _gpt2_hparams, conv1d=True, activations=_TANH_GELU),
}


def gguf_arch(config: Any) -> GgufArch:
    """The llama.cpp architecture for a transformers config, or an error naming the supported ones."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ExportError(f"GGUF export does not support model_type '{config.model_type}' yet; supported: "
                          f"{', '.join(ARCHITECTURES)}. Export with export_format: hf and convert the folder with "
                          "llama.cpp's convert_hf_to_gguf.py.")
    act = (getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)  # Gemma 2/3: the former
           or getattr(config, "activation_function", None))
    if act not in arch.activations:
        raise ExportError(f"{config.model_type} with activation '{act}' cannot be exported to GGUF: llama.cpp's "
                          f"{arch.name} graph computes {arch.activations[0]}.")
    return arch


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' rotate-half layout to llama.cpp's interleaved pairs.

    Rows (and biases, and a LoRA B) of q/k: per head [x_0..x_{d/2-1}, y_0..y_{d/2-1}] -> [x_0, y_0, x_1, y_1, ...].
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class TensorNames:
    """transformers parameter names -> GGUF names, plus the per-tensor layout changes llama.cpp expects."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.arch = gguf_arch(config)
        n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        self._map = gguf.get_tensor_name_map(self.arch.arch, n_layers)

    def gguf_name(self, hf_name: str) -> str:
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"Tensor '{hf_name}' has no place in llama.cpp's {self.arch.name} graph, so a GGUF "
                              "file cannot hold it. Export with export_format: hf instead.")
        return name

    def to_gguf_layout(self, gguf_name: str, w: torch.Tensor, *, rows_only: bool = False) -> torch.Tensor:
        """The tensor as llama.cpp reads it. `rows_only`: `w` is a LoRA B, whose rows are the output rows."""
        c = self.config
        if self.arch.conv1d and w.ndim == 2 and not rows_only and gguf_name.startswith("blk."):
            w = w.T
        if self.arch.norm_offset and gguf_name.endswith("norm.weight"):
            w = w + self.arch.norm_offset
        if self.arch.permute_qk:
            if ".attn_q." in gguf_name:
                w = permute_rows(w, c.num_attention_heads)
            elif ".attn_k." in gguf_name:
                w = permute_rows(w, c.num_key_value_heads or c.num_attention_heads)
        return w.contiguous()


def _rope_tensors(config: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Rope scalings that llama.cpp reads as per-dimension frequency divisors rather than as hyperparameters."""
    rope = _rope(config)
    if rope["rope_type"] == "llama3":
        yield "rope_freqs.weight", _llama3_rope_freqs(config, rope)
    elif rope["rope_type"] == "longrope":  # Phi-3: llama.cpp picks one set by its context size, see _phi3_hparams
        for kind in ("long", "short"):
            yield f"rope_factors_{kind}.weight", np.asarray(rope[f"{kind}_factor"], dtype=np.float32)


def _llama3_rope_freqs(config: Any, rope: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as per-dimension factors (rope_freqs)."""
    dim = _head_dim(config)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _is_norm_or_vector(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 1 or "_norm." in name or name.startswith(("rope_freqs.", "rope_factors_"))


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str, *, output_name: str) -> T:
    """The storage type of one tensor, by llama.cpp's converter's rules.

    Norms, biases and other vectors stay f32 (they are tiny and precision-critical). Block-quantized types need rows
    that are a whole number of blocks, else the tensor falls back to f16. With q4_0 the output projection (the tied
    embedding when there is none) is kept in q8_0, as llama.cpp's quantize tool keeps it in a higher-precision type:
    it is the most sensitive matrix.
    """
    qtype = GGUF_TYPES[gguf_type][0]
    if _is_norm_or_vector(name, shape) or qtype == T.F32:
        return T.F32
    if qtype in (T.F16, T.BF16):
        return qtype
    if qtype == T.Q4_0 and name == output_name:
        qtype = T.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else T.F16


def _encode(data: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return data.astype(np.float32, copy=False)
    if qtype == T.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _nbytes(shape: tuple[int, ...], qtype: T) -> int:
    if qtype == T.F32:
        return 4 * math.prod(shape)
    if qtype == T.F16:
        return 2 * math.prod(shape)
    return math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype))


Layout = Callable[[torch.Tensor], torch.Tensor]  # a tensor as transformers holds it -> as llama.cpp reads it


def _model_tensors(model: torch.nn.Module, names: TensorNames) -> Iterator[tuple[str, torch.Tensor, Layout]]:
    """(GGUF name, tensor, layout change) for every tensor llama.cpp needs, in the model's order."""
    for name, factors in _rope_tensors(model.config):
        yield name, torch.from_numpy(factors), lambda t: t
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when the file has no output tensor
        name = names.gguf_name(hf_name)
        yield name, tensor.detach(), functools.partial(names.to_gguf_layout, name)


def new_writer(arch: GgufArch, kind: gguf.GGUFType, name: str) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(None, arch.name)
    writer.add_type(kind)
    writer.add_name(name)
    return writer


def write_tensors(writer: gguf.GGUFWriter, tensors: list[tuple[str, torch.Tensor, Layout]], path: str | os.PathLike,
                  gguf_type: str, *, output_name: str = "", progress: bool = True) -> Path:
    """Write the metadata in `writer` and `tensors` to `path`, atomically, converting one tensor at a time."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"Unknown GGUF type '{gguf_type}'; choose one of: {', '.join(GGUF_TYPES)}.")
    writer.add_file_type(GGUF_TYPES[gguf_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    path = Path(path)
    plan = []
    for name, tensor, layout in tensors:  # the header lists every tensor's type and size before any data
        shape = tuple(layout(tensor.to("meta")).shape)
        qtype = tensor_type(name, shape, gguf_type, output_name=output_name)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        plan.append((tensor, layout, qtype))

    def write(tmp: str) -> None:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, layout, qtype in tqdm(plan, desc=f"write {path.name}", unit="tensor", disable=not progress,
                                          dynamic_ncols=True):
            writer.write_tensor_data(_encode(layout(tensor.to(torch.float32)).numpy(), qtype))
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike, *, gguf_type: str = "f16",
               model_name: str | None = None, progress: bool = True) -> Path:
    """Write `model` (a plain transformers causal LM, adapters merged) and its tokenizer to one GGUF file."""
    names = TensorNames(model.config)
    writer = new_writer(names.arch, gguf.GGUFType.MODEL, model_name or Path(path).stem)
    names.arch.write_hparams(writer, model.config)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    tensors = list(_model_tensors(model, names))
    output_name = "output.weight" if any(n == "output.weight" for n, _, _ in tensors) else "token_embd.weight"
    return write_tensors(writer, tensors, path, gguf_type, output_name=output_name, progress=progress)
