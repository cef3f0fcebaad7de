"""transformers' DynamicCache for the decode loop: room to grow in place, and row surgery for continuous batching
(add rows, drop rows, left-pad, trim).

The only module that reaches into the cache's layers (`cache.layers[i].keys / .values`, [batch, heads, seq, dim]),
so that the next change to transformers' Cache touches this file alone. Row surgery needs full-attention layers
(`rows_supported`); sliding-window and other layers are left as transformers makes them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with spare positions: a decode step writes its
    one position instead of copying the whole cache (DynamicLayer's torch.cat, 10% of a batch-8 step). Same values,
    so attention computes the same numbers. Anything that replaces `keys` / `values` (the row surgery below,
    transformers' own `batch_select_indices`) is picked up: the next update copies them into a new buffer."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.keys.shape[-2] if self.keys.numel() else 0
        new = key_states.shape[-2]
        buffers = getattr(self, "_buffers_kv", None)
        if (buffers is None or buffers[0].shape[-2] < used + new or buffers[0].shape[:2] != key_states.shape[:2]
                or not self.keys.numel() or self.keys.data_ptr() != buffers[0].data_ptr()
                or self.values.data_ptr() != buffers[1].data_ptr()):
            room = max(2 * (used + new), used + new + 64)
            buffers = tuple(self._grown(old, states, used, room)
                            for old, states in ((self.keys, key_states), (self.values, value_states)))
            self._buffers_kv = buffers
        buffers[0][:, :, used:used + new] = key_states
        buffers[1][:, :, used:used + new] = value_states
        self.keys, self.values = buffers[0][:, :, :used + new], buffers[1][:, :, :used + new]
        return self.keys, self.values

    @staticmethod
    def _grown(old: torch.Tensor, states: torch.Tensor, used: int, room: int) -> torch.Tensor:
        b, h, _, d = states.shape
        buffer = states.new_empty(b, h, room, d)
        if used:
            buffer[:, :, :used] = old
        return buffer


def new_cache(model: Any) -> Any:
    """The cache `generate` would make for `model` (a DynamicCache over its decoder config), its full-attention
    layers growing in place."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    cache = DynamicCache(config=config)
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer for layer in layers):
        cache.layers = [GrowingLayer() for _ in layers]
    return cache


def rows_supported(cache: Any) -> bool:
    """Whether rows of `cache` can be added, dropped and padded here (every layer a full-attention one)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, GrowingLayer) for layer in layers)


def _filled(cache: Any) -> list[Any]:
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False) and layer.keys.numel()]


def length(cache: Any) -> int:
    filled = _filled(cache)
    return filled[0].keys.shape[-2] if filled else 0


def left_pad(cache: Any, n: int) -> None:
    """Put `n` empty positions before every row (the attention mask must mark them 0)."""
    if n <= 0:
        return
    for layer in _filled(cache):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            pad = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
            setattr(layer, name, torch.cat([pad, t], dim=-2))


def drop_left(cache: Any, n: int) -> None:
    """Remove the first `n` positions of every row (positions that are padding in every row)."""
    if n <= 0:
        return
    for layer in _filled(cache):
        layer.keys = layer.keys[..., n:, :].contiguous()
        layer.values = layer.values[..., n:, :].contiguous()


def keep_rows(cache: Any, index: torch.Tensor) -> None:
    """Keep only the rows at `index`, in that order (any cache: transformers' own row selection)."""
    cache.batch_select_indices(index)


def append_rows(cache: Any, other: Any) -> None:
    """Put `other`'s rows after `cache`'s; both must be as long (see `left_pad`)."""
    for layer, extra in zip(_filled(cache), _filled(other)):
        layer.keys = torch.cat([layer.keys, extra.keys], dim=0)
        layer.values = torch.cat([layer.values, extra.values], dim=0)


def fill(cache: Any, rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]] | None], lengths: Sequence[int],
         width: int) -> None:
    """Put into an empty `cache` each row's first `lengths[i]` positions of `rows[i]` (per layer (keys, values),
    [kv heads, positions, head dim]), right-aligned in `width` positions; the rest is zeros (padding, which the
    attention mask must mark 0)."""
    first = next(r for r in rows if r is not None)
    for index, (k0, _) in enumerate(first):
        keys = k0.new_zeros(len(rows), k0.shape[0], width, k0.shape[2])
        values = torch.zeros_like(keys)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            if n:
                k, v = row[index]
                keys[i, :, width - n:] = k[:, :n]
                values[i, :, width - n:] = v[:, :n]
        cache.update(keys, values, index)


def row_span(cache: Any, row: int, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of `row`'s keys and values at positions [start, end) of every layer."""
    return [(layer.keys[row, :, start:end].clone(), layer.values[row, :, start:end].clone())
            for layer in cache.layers]
