"""bf16 linear weights packed once for oneDNN, for decoding on CPUs (used by `fast_layers.FastLayers`).

`F.linear` on a bf16 CPU weight lets oneDNN reorder the whole weight into its blocked layout on every call: at batch
1, where a decode step reads each weight once, that copy costs about as much as the product itself (SmolLM2-135M on
a 2-core EPYC with avx512_bf16: 37 ms of linear time per token unpacked, 25 ms packed). Packing once, as inductor's
freezing pass does, removes it. The product is oneDNN's same kernel on the same data, so results are bit-identical;
`exact` checks that on this machine before anything is packed. The packed copy doubles the weights' memory, so
packing is skipped when memory is short, and can be turned off with PEFTKIT_PACK_WEIGHTS=0.
"""

from __future__ import annotations

import threading

import torch

PACK_ENV = "PEFTKIT_PACK_WEIGHTS"  # "0" turns packing off (to compare, or where memory is short)


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_exact_result: bool | None = None
_exact_lock = threading.Lock()


def exact() -> bool:
    """Whether packed products equal F.linear bit for bit here (a few shapes and row counts, with and without bias)."""
    global _exact_result
    with _exact_lock:
        if _exact_result is None:
            _exact_result = _probe()
        return _exact_result


def _probe() -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    g = torch.Generator().manual_seed(0)
    try:
        for out_f, in_f in ((96, 64), (64, 160), (40, 64)):
            w = torch.randn(out_f, in_f, generator=g).to(torch.bfloat16)
            b = torch.randn(out_f, generator=g).to(torch.bfloat16)
            packed = pack(w)
            for rows in (1, 3, 8):
                x = torch.randn(rows, 1, in_f, generator=g).to(torch.bfloat16)
                for bias in (None, b):
                    if not torch.equal(torch.nn.functional.linear(x, w, bias), packed_linear(x, packed, bias)):
                        return False
    except RuntimeError:  # a oneDNN without bf16 support on this CPU
        return False
    return True
