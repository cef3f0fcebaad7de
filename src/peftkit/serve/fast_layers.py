"""How a decode step's linear layers multiply: faster products swapped into a model's plain nn.Linear layers while
`FastLayers.active(tree)` is entered, for the decode loop (chat, predict, the API, the RL stages' rollouts).

- fp32 weights: peftkit's small-batch kernel (`gemv.py`) for products of up to `gemv.MAX_ROWS` rows, where it
  measures faster than torch's on this machine (results equal to fp32 rounding, batch-invariant). A weight whose
  elements are all bf16 values (a bf16 checkpoint loaded in fp32) is read from a bf16 copy: half the bytes, the same
  numbers. More rows (a prefill) go to torch.
- bf16 weights: oneDNN with the weight packed once (`packed.py`; bit-identical to F.linear), where that is exact.
Anything with gradients runs as before the swap; so does a layer with neither.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from torch import nn

from ..precision import free_memory_bytes
from . import gemv, packed

Product = Callable[[torch.Tensor], torch.Tensor]


def _eligible(layer: nn.Module) -> bool:
    """Plain nn.Linear (not a quantized subclass) with a 2-D fp32 or bf16 weight on the CPU."""
    w = getattr(layer, "weight", None)
    return (type(layer) is nn.Linear and isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type == "cpu"
            and w.dtype in (torch.float32, torch.bfloat16))


class FastLayers:
    """The products of decode-time linear layers, shared by every module tree over the same tensors (one packed copy
    per weight), swapped into a tree's layers while `active(tree)` is entered. A weight or bias changed since its
    product was prepared (an adapter merged into it) is prepared again on the next entry. The eligible layers of a
    tree are found once: call `forget` after changing which modules a tree holds (loading an adapter)."""

    def __init__(self, kernel: bool = True) -> None:
        self.kernel = kernel  # False: never peftkit's kernel (to compare)
        self.packs: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id(w) -> (w, version, packed w)
        self.trees: dict[int, tuple[nn.Module, list[nn.Linear]]] = {}  # id(tree) -> (tree, its eligible layers)
        self.halves: dict[int, tuple[torch.Tensor, int, torch.Tensor | None]] = {}  # id(w) -> (w, version, bf16 w)
        self.bound: dict[int, tuple] = {}  # id(layer) -> (weight, bias, versions..., forward or None)
        self.pack = os.environ.get(packed.PACK_ENV, "1") != "0"

    def forget(self) -> None:
        self.trees.clear()
        self.bound.clear()

    def _layers(self, tree: nn.Module) -> list[nn.Linear]:
        entry = self.trees.get(id(tree))
        if entry is None or entry[0] is not tree:
            layers = [m for m in tree.modules() if _eligible(m)]
            bf16 = {id(m.weight): m.weight for m in layers if m.weight.dtype == torch.bfloat16}
            if self.pack and bf16 and not self.packs:  # the first use: is packing exact here, is there room?
                size = sum(w.numel() * w.element_size() for w in bf16.values())
                self.pack = packed.exact() and 2 * size <= free_memory_bytes()
            entry = self.trees[id(tree)] = (tree, layers)
        return entry[1]

    @contextlib.contextmanager
    def active(self, tree: nn.Module) -> Iterator[None]:
        """Within: the eligible layers of `tree` multiply through the products above (under no_grad)."""
        swapped = []
        for layer in self._layers(tree):
            w, bias = layer._parameters.get("weight"), layer._parameters.get("bias")
            cached = self.bound.get(id(layer))
            # (weight, bias, their versions, forward): prepared again when any of them changed
            if (cached is None or cached[0] is not w or cached[1] is not bias or cached[2] != w._version
                    or (bias is not None and cached[3] != bias._version)):
                forward = self._forward(w, bias) if w is not None and _eligible(layer) else None
                cached = self.bound[id(layer)] = (w, bias, getattr(w, "_version", None),
                                                  None if bias is None else bias._version, forward)
            if cached[4] is not None:
                layer.__dict__["forward"] = cached[4]
                swapped.append(layer)
        try:
            yield
        finally:
            for layer in swapped:
                layer.__dict__.pop("forward", None)

    def _forward(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Product | None:
        """The layer's decode-time forward, or None to leave the layer as it is."""
        if weight.dtype == torch.bfloat16:
            packed_product = self._packed(weight, bias)
            if packed_product is None:
                return None

            def packed_forward(x: torch.Tensor) -> torch.Tensor:
                if torch.is_grad_enabled() or x.dtype != weight.dtype:
                    return torch.nn.functional.linear(x, weight, bias)
                return packed_product(x)

            return packed_forward
        if not (self.kernel and gemv.eligible(weight) and gemv.faster()):
            return None
        bias32 = None if bias is None else bias.detach().float().contiguous()
        halves = self.bf16_copy(weight)
        read = weight if halves is None else halves
        bound = gemv.MAX_ROWS * weight.shape[1]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() or x.dtype != weight.dtype or x.numel() > bound:
                return torch.nn.functional.linear(x, weight, bias)
            return gemv.linear(x, read, bias32)

        return forward

    def bf16_copy(self, weight: torch.Tensor) -> torch.Tensor | None:
        """A bf16 copy of an fp32 weight whose every element is a bf16 value (a bf16 checkpoint loaded in fp32): the
        kernel reads half the bytes and multiplies the same numbers in fp32. None for other weights, or when the
        copies would not fit in half the free memory."""
        entry = self.halves.get(id(weight))
        if entry is not None and entry[0] is weight and entry[2] is None:  # refused once, not checked again: an
            return None  # optimizer's updates keep it off bf16 values (an RL stage's full fine-tuning, every step)
        if entry is None or entry[0] is not weight or entry[1] != weight._version:
            copy = weight.detach().to(torch.bfloat16)
            room = free_memory_bytes() // 2 - sum(e[2].numel() * 2 for e in self.halves.values() if e[2] is not None)
            if copy.numel() * 2 > room or not torch.equal(copy.float(), weight):
                copy = None
            entry = self.halves[id(weight)] = (weight, weight._version, copy)
        return entry[2]

    def _packed(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Product | None:
        """oneDNN's product on the bf16 weight packed once, where that is exact here; else None."""
        if not self.pack or not packed.exact():
            return None
        entry = self.packs.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] != weight._version:
            entry = self.packs[id(weight)] = (weight, weight._version, packed.pack(weight))
        packed_weight = entry[2]
        return lambda x: packed.packed_linear(x, packed_weight, bias)
