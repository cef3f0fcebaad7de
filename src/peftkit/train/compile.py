"""`torch_compile: true`: the decoder layers run through torch.compile (inductor) in training steps.

Each decoder layer class's forward is compiled once, with dynamic shapes (a padding-free batch's token count changes
every step), and shared by all layers of that class, so a model compiles its layer twice (the first layer's input
needs no gradient, the others' do), not once per layer. Padding-free attention stays outside the graphs
(`varlen.outside_compiled_graphs`), and the layers' RMSNorms and SwiGLU MLPs are left to inductor, which fuses them
itself, instead of peftkit's C kernels (`fused_ops.left_to_compiler`). Only training steps run compiled; evaluation,
generation and a stage's rollouts run the layers eagerly, so they never trigger a compile for another mode. With
`gradient_checkpointing` the layers run eagerly too: torch's checkpoint disables dynamo inside it (the config warns).

Off by default: on the README benchmark's job, on 2 CPU cores, the compiled step is 0.99x-1.06x the eager one (the
fused kernels already cover what inductor fuses) while the compile takes 10-40 s (docs/performance.md, "torch.compile
of the decoder layers"). Inductor's compiled code is cached in $TORCHINDUCTOR_CACHE_DIR, by default
$PEFTKIT_HOME/inductor, so a later run of the same model and settings compiles from the cache in a fraction of that.
"""

from __future__ import annotations

import os
import types
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import fused_ops, varlen
from ..errors import ConfigError
from ..models import layer_stack, peftkit_home

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
_compiled: dict[type, Callable[..., Any]] = {}  # a layer class -> its compiled forward, shared by its layers


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (`models.layer_stack`)."""
    found = layer_stack(model)
    if found is None:
        raise ConfigError(f"torch_compile: found no decoder layers to compile in {type(model).__name__} (no "
                          "nn.ModuleList of same-typed blocks); set torch_compile: false.")
    return list(found[1])


def cache_dir() -> str:
    """Where inductor keeps compiled code between runs: $TORCHINDUCTOR_CACHE_DIR if set, else $PEFTKIT_HOME/inductor
    (set here, before the first compile reads it)."""
    return os.environ.setdefault(CACHE_ENV, str(peftkit_home() / "inductor"))


def _compiled_forward(cls: type) -> Callable[..., Any]:
    if cls not in _compiled:
        cache_dir()  # before the first call compiles
        _compiled[cls] = torch.compile(cls.forward, dynamic=True)
    return _compiled[cls]


@contextmanager
def compiled_layers(model: nn.Module) -> Iterator[None]:
    """Inside the block (a training step's forward and backward), `model`'s decoder layers run their compiled forward;
    outside it, their own."""
    layers = decoder_layers(model)
    inner = [m for layer in layers for m in layer.modules() if m is not layer]
    with ExitStack() as stack:
        stack.enter_context(varlen.outside_compiled_graphs())
        stack.enter_context(fused_ops.left_to_compiler(inner))
        for layer in layers:
            layer.forward = types.MethodType(_compiled_forward(type(layer)), layer)
        try:
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
