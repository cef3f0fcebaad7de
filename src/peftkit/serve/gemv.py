"""Linear layers of a decode step through peftkit's own small-batch kernel (`gemv.c`), on x86-64 CPUs with AVX2.

Why: a decode step at batch 1-8 reads every weight once for a few rows of activations, so its speed is the memory
bandwidth. torch's CPU products do not reach it there: on a 2-core AMD EPYC (AVX2 only, ~21 GB/s to memory)
SmolLM2-135M's linear layers took 53 ms per token in fp32 through MKL (10 GB/s) and 32 ms in bf16 through oneDNN
(8 GB/s, converting the weights on every call), against 17 ms for this kernel on the bf16 weights (16 GB/s); at 8
rows MKL took ~100 ms, this kernel ~35 ms (docs/performance.md, "Decode").

The kernel takes fp32 activations and fp32 weights, or bf16 copies of fp32 weights that hold bf16 values (a bf16
checkpoint loaded in fp32: half the bytes), and accumulates in fp32 as MKL does, in another summation order: results
equal torch's to fp32 rounding. A row's result does not depend on the rows beside it or on the thread count. Here,
one product at a time (`fast_layers.FastLayers`), bf16 models keep torch's (or oneDNN's packed) bf16 products, whose
exact rounding transformers' own generate shares; the decoder-layer kernel below takes bf16 models whole.

The same library holds `peftkit_decode_layers`: a Llama model's whole stack of decoder layers for one decode step,
around these products (llama_step.NativeLayers).

It is C, built on first use with the system's C compiler into peftkit's cache (a fraction of a second); without a
compiler, or on another CPU, or with PEFTKIT_GEMV=0, nothing changes: torch multiplies as before.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import native

GEMV_ENV = "PEFTKIT_GEMV"  # "0": torch multiplies every decode step (to compare)
MAX_ROWS = 16  # more rows than this (a prefill) go to torch's GEMM, which is compute-efficient there
_SOURCE = Path(__file__).with_name("gemv.c")
_PROBE_BYTES = 128 * 2**20

_lock = threading.Lock()
_faster: bool | None = None


class Layer(ctypes.Structure):
    """One decoder layer for `peftkit_decode_layers` (gemv.c's `peftkit_layer`)."""

    _fields_ = [("w", ctypes.c_void_p * 7), ("bf16", ctypes.c_int * 7), ("bias", ctypes.c_void_p * 7),
                ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("keys", ctypes.c_void_p),
                ("values", ctypes.c_void_p), ("stride_b", ctypes.c_int64), ("stride_h", ctypes.c_int64),
                ("stride_t", ctypes.c_int64), ("lora_a", ctypes.c_void_p * 7), ("lora_b", ctypes.c_void_p * 7),
                ("rank", ctypes.c_int64 * 7), ("qnorm", ctypes.c_void_p), ("knorm", ctypes.c_void_p)]


@dataclasses.dataclass(frozen=True)
class Kernels:
    gemv: Any  # peftkit_gemv: the products
    layers: Any  # peftkit_decode_layers: a Llama model's decoder layers for one decode step (llama_step.py)


def _declare(library: ctypes.CDLL) -> Kernels:
    fn = library.peftkit_gemv
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    fn.restype = ctypes.c_int
    layers = library.peftkit_decode_layers
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    layers.argtypes = [ctypes.POINTER(Layer), i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64,
                       ctypes.c_float, ctypes.c_float, i64, ctypes.c_int, ptr, ctypes.c_int]
    layers.restype = ctypes.c_int
    return Kernels(fn, layers)


LIBRARY = native.Library(_SOURCE, GEMV_ENV, _declare)


def kernel() -> Kernels | None:
    """The loaded kernels, or None (see `LIBRARY.why_not`)."""
    return LIBRARY.load()


def eligible(weight: torch.Tensor) -> bool:
    """A weight the kernel multiplies: 2-D, contiguous, fp32, on the CPU (bf16 copies of it are made by the caller)."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.is_contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for an fp32 x of at most MAX_ROWS rows, once `kernel()` has loaded the kernel; the
    weight fp32 or bf16 (multiplied as its fp32 values), `bias` fp32. Lean: a decode step makes ~200 of these calls."""
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    status = LIBRARY.loaded.gemv(x.data_ptr(), weight.data_ptr(), weight.dtype == torch.bfloat16,
                     None if bias is None else bias.data_ptr(), y.data_ptr(), x.numel() // k, n, k,
                     torch.get_num_threads())
    if status != 0:
        return torch.nn.functional.linear(x, weight.float(), bias)
    return y


def faster() -> bool:
    """Whether the kernel beats torch's fp32 product at one row on this machine. Measured once: 128 MB of fp32
    1536 x 576 weights (a decode step's weights do not fit a CPU cache either), each multiplied by one row, the best
    of 3 passes; the kernel must be 10% faster. (Its bf16 copies of weights read half the bytes: faster still.)"""
    global _faster
    with _lock:
        if _faster is not None:
            return _faster
    if kernel() is None:
        return False
    count = _PROBE_BYTES // (1536 * 576 * 4)
    weights = [torch.full((1536, 576), 0.01) for _ in range(count)]  # written: real pages, not the zero page
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        products = {"ours": [functools.partial(linear, weight=w, bias=None) for w in weights],
                    "theirs": [functools.partial(torch.nn.functional.linear, weight=w) for w in weights]}
        for fns in products.values():  # warm-up: first-call allocations
            fns[0](x)
        best = {name: min(_timed(fns, x) for _ in range(3)) for name, fns in products.items()}
    with _lock:
        _faster = best["ours"] < 0.9 * best["theirs"]
        return _faster


def _timed(products: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> float:
    start = time.perf_counter()
    for product in products:
        product(x)
    return time.perf_counter() - start
