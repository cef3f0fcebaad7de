"""bf16 linear layers with their weights packed once for oneDNN, for decoding on CPUs.

`F.linear` on a bf16 CPU weight lets oneDNN reorder the whole weight into its blocked layout on every call: at batch
1, where a decode step reads each weight once, that copy costs about as much as the product itself (SmolLM2-135M on
a 2-core EPYC with avx512_bf16: 37 ms of linear time per token unpacked, 25 ms packed). Packing once, as inductor's
freezing pass does, removes it. The product is oneDNN's same kernel on the same data, so results are bit-identical;
`_exact` checks that on this machine before anything is packed. The packed copy doubles the weights' memory, so
packing is skipped when memory is short, and can be turned off with PEFTKIT_PACK_WEIGHTS=0.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

import torch
from torch import nn

PACK_ENV = "PEFTKIT_PACK_WEIGHTS"  # "0" turns packing off (to compare, or where memory is short)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_exact_result: bool | None = None
_exact_lock = threading.Lock()


def _exact() -> bool:
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
            packed = _pack(w)
            for rows in (1, 3, 8):
                x = torch.randn(rows, 1, in_f, generator=g).to(torch.bfloat16)
                for bias in (None, b):
                    if not torch.equal(torch.nn.functional.linear(x, w, bias), _packed_linear(x, packed, bias)):
                        return False
    except RuntimeError:  # a oneDNN without bf16 support on this CPU
        return False
    return True


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _eligible(layer: nn.Module) -> bool:
    """Plain nn.Linear (not a quantized subclass) with a 2-D bf16 weight on the CPU."""
    w = getattr(layer, "weight", None)
    return (type(layer) is nn.Linear and isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16
            and w.device.type == "cpu" and w.dim() == 2)


class PackedWeights:
    """Packed copies of bf16 linear weights, shared by every module tree over the same tensors (one copy each), and
    swapped into a tree's layers while `active(tree)` is entered. A weight changed since it was packed (an adapter
    merged into it) is packed again on the next entry. The eligible layers of a tree are found once: call `forget`
    after changing which modules a tree holds (loading an adapter)."""

    def __init__(self) -> None:
        self.packs: dict[int, tuple[torch.Tensor, int, Callable]] = {}  # id(w) -> (w, version, packed forward)
        self.trees: dict[int, tuple[nn.Module, list[nn.Linear]]] = {}  # id(tree) -> (tree, its eligible layers)
        self.bound: dict[int, tuple] = {}  # id(layer) -> (weight, version, bias, forward): what `active` swaps in
        self.enabled = os.environ.get(PACK_ENV, "1") != "0"

    def forget(self) -> None:
        self.trees.clear()
        self.bound.clear()

    def _layers(self, tree: nn.Module) -> list[nn.Linear]:
        entry = self.trees.get(id(tree))
        if entry is None or entry[0] is not tree:
            layers = [m for m in tree.modules() if _eligible(m)]
            if layers and not self.packs:  # the first use: is it exact here, and is there room for the copy?
                size = sum(w.numel() * w.element_size() for w in {id(m.weight): m.weight for m in layers}.values())
                if not _exact() or 2 * size > _available_bytes():
                    self.enabled = False
            entry = self.trees[id(tree)] = (tree, layers)
        return entry[1] if self.enabled else []  # none packed where packing is not exact (a CPU without AVX-512)

    @contextlib.contextmanager
    def active(self, tree: nn.Module) -> Iterator[None]:
        """Within: the eligible layers of `tree` multiply with packed weights (under no_grad; else as before)."""
        layers = self._layers(tree) if self.enabled else []
        for layer in layers:
            w = layer._parameters.get("weight")
            cached = self.bound.get(id(layer))  # (weight, version, bias, forward)
            if cached is None or cached[0] is not w or cached[1] != w._version or cached[2] is not layer.bias:
                if w is None or not _eligible(layer):
                    continue
                entry = self.packs.get(id(w))
                if entry is None or entry[0] is not w or entry[1] != w._version:
                    entry = self.packs[id(w)] = (w, w._version, _forward(w, _pack(w)))
                cached = self.bound[id(layer)] = (w, w._version, layer.bias, _bound(entry[2], layer.bias))
            layer.__dict__["forward"] = cached[3]
        try:
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)


def _bound(forward: Callable, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: forward(x, bias)


def _forward(weight: torch.Tensor, packed: torch.Tensor) -> Callable:
    def forward(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.bfloat16:
            return torch.nn.functional.linear(x, weight, bias)
        return _packed_linear(x, packed, bias)

    return forward
