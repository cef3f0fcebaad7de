"""Padding-free attention's matmul path (short examples, training, half precision on CPU) against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import varlen


def _qkv(n: int, dtype: torch.dtype, heads: int = 6, kv_heads: int = 2, dim: int = 16) -> list[torch.Tensor]:
    torch.manual_seed(0)
    shapes = [(1, heads, n, dim), (1, kv_heads, n, dim), (1, kv_heads, n, dim)]
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def _forward_backward(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return [out.detach().float(), *(g.float() for g in torch.autograd.grad(out, (q, k, v), grad))]


@pytest.mark.parametrize("kv_heads", [6, 2])  # plain multi-head and grouped-query
def test_matmul_attention_equals_sdpa_fp32(kv_heads: int) -> None:
    q, k, v = _qkv(37, torch.float32, kv_heads=kv_heads)
    ours = _forward_backward(lambda a, b, c: varlen._matmul_attention(a, b, c, 0.3), q, k, v)
    sdpa = _forward_backward(lambda a, b, c: F.scaled_dot_product_attention(
        a, b, c, is_causal=True, scale=0.3, enable_gqa=kv_heads != 6), q, k, v)
    for a, b in zip(ours, sdpa):  # output, then the gradients of q, k and v
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_training_in_bf16_takes_the_matmul_path_only_where_it_is_faster(monkeypatch) -> None:
    calls: list[int] = []
    real = varlen._matmul_attention
    monkeypatch.setattr(varlen, "_matmul_attention", lambda q, *a: calls.append(q.shape[-2]) or real(q, *a))
    short = _qkv(20, torch.bfloat16)
    out = varlen._segment_attention(*short, None, None)
    expected = F.scaled_dot_product_attention(*short, is_causal=True, enable_gqa=True)
    assert calls == [20]
    assert (out.float() - expected.float()).norm() <= 1e-2 * expected.float().norm()  # bf16 scores: rounding only
    varlen._segment_attention(*_qkv(varlen.MATMUL_ATTENTION_MAX_LEN + 1, torch.bfloat16), None, None)
    with torch.no_grad():  # evaluation and generation keep SDPA
        varlen._segment_attention(*short, None, None)
    varlen._segment_attention(*_qkv(20, torch.float32), None, None)  # fp32 keeps SDPA: its kernel is faster there
    assert calls == [20]
