"""Padding-free ("varlen") attention: a micro-batch laid out as one row of concatenated examples.

The collator (`SFTCollator(padding_free=True)`) writes every example of a micro-batch, packed or not, into a single
row and records where each example starts in `cu_seq_lens_q` (cumulative lengths, FlashAttention's convention).
Nothing is padded, so no compute goes to pad tokens, and the vocabulary projection can be limited to exactly the
label positions. Attention runs per example with causal SDPA, so its cost is the sum of squared example lengths
rather than the square of the row: no example sees another and no L x L mask is ever built.

transformers routes attention through a registry; `varlen_attention(model)` switches a model to our entry for the
duration of a forward. Models not built on that registry, or with attention features SDPA lacks (logit softcapping,
attention sinks), keep padded batches: see `supports_padding_free`.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F

from . import fused_ops
from .methods import virtual_tokens as vt

ATTN_NAME = "peftkit_varlen"
_SUPPORTED_BASE = ("sdpa", "eager") + tuple(vt.ATTN_PREFIX + impl for impl in ("sdpa", "eager"))


# Longest example that `_matmul_attention` takes instead of SDPA: see its docstring.
MATMUL_ATTENTION_MAX_LEN = 256


@functools.lru_cache(maxsize=64)
def _future_bias(n: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """-inf above the diagonal, 0 elsewhere, stacked `groups` times: [groups * n, n], added to the scores."""
    bias = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)
    return bias.repeat(groups, 1)


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of one example as two batched matmuls and a softmax, in the model's half precision, where
    the attention kernel does not take the row (fp16, the kernels off or not built: `fused_ops.attention`).

    Why: on CPU, SDPA's flash kernel runs its backward in small blocks for short sequences; in bf16, for examples of
    up to ~256 tokens, autograd through these ops is ~1.7x faster per attention layer (docs/performance.md,
    "attention"). The scores are rounded to bf16 before the softmax, as transformers' eager attention does; the
    softmax accumulates in fp32 and keeps its output in bf16, the one tensor saved for backward (an fp32 copy would
    add ~150 MB to the benchmark job's peak for the same gradients: 0.47% from fp32 SDPA's either way).
    Grouped-query heads share their key/value head by folding the group into the matmul's rows.
    """
    _, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    # squeeze(0), not [0]: a view both ways, where indexing's backward writes its gradient into a fresh zero tensor
    rows = q.squeeze(0).reshape(kv_heads, groups * n, dim)
    bias = _future_bias(n, groups, q.dtype, q.device)
    scores = torch.baddbmm(bias, rows, k.squeeze(0).transpose(1, 2), alpha=scaling)  # [kv_heads, groups * n, n]
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v.squeeze(0)).view(1, heads, n, dim)


def _use_matmul_attention(q: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and q.shape[-2] <= MATMUL_ATTENTION_MAX_LEN)


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
                       sliding_window: int | None, prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    n = q.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if prefix is not None:  # virtual tokens (methods/virtual_tokens.py) before this example
        k, v, mask = vt.with_prefix(q, k, v, None, prefix, sliding_window, positions, "bool")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    if (sliding_window is None or n <= sliding_window) and _use_matmul_attention(q):
        return _matmul_attention(q, k, v, q.shape[-1] ** -0.5 if scaling is None else scaling)
    if sliding_window is None or n <= sliding_window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    i = torch.arange(n, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < sliding_window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)


_last_bounds: list = [None, []]  # (cu_seq_lens tensor, its values): every layer of a forward reads the same one


def _bounds(cu_seq_lens: torch.Tensor) -> list[int]:
    """The example boundaries as Python ints, read from the device once per batch instead of once per layer (on a
    GPU each read waits for the queued work)."""
    if _last_bounds[0] is not cu_seq_lens:
        _last_bounds[:] = [cu_seq_lens, cu_seq_lens.tolist()]
    return _last_bounds[1]


def _by_example(tensor: torch.Tensor, bounds: list[int], dim: int) -> tuple[torch.Tensor, ...]:
    """The examples of a flattened row along `dim`. One `split` rather than a slice per example: its backward writes
    the examples' gradients into one tensor, where each slice's backward would make a zero tensor of the whole row
    and add them up (~3% of a LoRA step on SmolLM2 in fp32: docs/performance.md, "Smaller changes")."""
    if bounds[0] == 0 and bounds[-1] == tensor.shape[dim]:
        return tensor.split([e - s for s, e in zip(bounds[:-1], bounds[1:])], dim=dim)
    return tuple(tensor.narrow(dim, s, e - s) for s, e in zip(bounds[:-1], bounds[1:]))


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: query/key/value are [1, heads, tokens, head_dim].

    Virtual-token methods pass their prefix (or, for the pass that computes it, a dict to record into) as keywords.
    """
    prefix = kwargs.pop(vt.PREFIX_KWARG, None)
    record = kwargs.pop(vt.RECORD_KWARG, None)
    if record is not None:  # prompt tuning's pass over the virtual tokens alone: one causal sequence
        record[module.layer_idx] = (key, value)
        cu_seq_lens_q = torch.tensor([0, query.shape[2]], dtype=torch.int32)
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise RuntimeError("peftkit's padding-free attention needs one flattened row and its cu_seq_lens_q; "
                           "build batches with SFTCollator(padding_free=True).")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise RuntimeError("This model's attention uses softcapping or sinks, which padding-free attention does not "
                           "implement; set padding_free: false.")
    if dropout and module.training:
        raise RuntimeError("Padding-free attention does not apply attention dropout; set padding_free: false.")
    bounds = _bounds(cu_seq_lens_q)
    layer_prefix = prefix[module.layer_idx] if prefix is not None else None
    if layer_prefix is None:
        fused = fused_ops.attention(query, key, value, bounds, query.shape[-1] ** -0.5 if scaling is None else scaling,
                                    sliding_window)
        if fused is not None:  # the whole row in one kernel call (in a training step): fused_ops.attention
            return fused, None
    positions = kwargs.get("position_ids")
    pieces = zip(*(_by_example(t, bounds, dim=2) for t in (query, key, value)))
    parts = [
        _segment_attention(q, k, v, scaling, sliding_window, layer_prefix,
                           None if positions is None else positions[:, s:e])
        for (q, k, v), s, e in zip(pieces, bounds[:-1], bounds[1:])
    ]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


_compiled_layers = 0  # outside_compiled_graphs blocks open now (train/compile.py)


@functools.cache
def _outside_graphs() -> Callable[..., tuple[torch.Tensor, None]]:
    """`varlen_attention_forward` as torch.compile leaves it, run eagerly between a compiled layer's graphs: its split
    at the batch's example boundaries would recompile the layer every step, and the fused kernels are ctypes calls
    that compile cannot trace."""
    return torch.compiler.disable(varlen_attention_forward)


@contextmanager
def outside_compiled_graphs() -> Iterator[None]:
    """Inside the block, padding-free attention is kept out of torch.compile's graphs (see `_outside_graphs`)."""
    global _compiled_layers
    _compiled_layers += 1
    try:
        yield
    finally:
        _compiled_layers -= 1


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _outside_graphs() if _compiled_layers else varlen_attention_forward)


def supports_padding_free(model: torch.nn.Module) -> bool:
    """Whether the model's attention goes through transformers' registry with a kernel we can replace exactly."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in _SUPPORTED_BASE + (ATTN_NAME,):
        return False
    if getattr(config, "attn_logit_softcapping", None) or not getattr(config, "is_causal", True):
        return False
    if getattr(config, "attention_dropout", 0.0):
        return False
    return getattr(model, "_supports_attention_backend", False) or getattr(model, "_supports_sdpa", False)


@contextmanager
def varlen_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run the model's attention layers with padding-free attention inside the block, as loaded outside it."""
    _register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = before


def attention_for(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ContextManager[None]:
    """The attention a batch needs: padding-free for flattened batches, the model's own otherwise. The trainer holds
    it over forward *and* backward, since gradient checkpointing recomputes attention during the backward pass. A DDP
    wrapper is looked through to the model it runs."""
    return varlen_attention(getattr(model, "module", model)) if "cu_seq_lens_q" in batch else nullcontext()
