"""A KV cache layer for sampling that appends in place, into room reserved for the completion up front."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class ReservedLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose keys and values live in buffers with room for ``reserve`` more tokens.

    transformers' layer concatenates at every step, so each new token copies the whole cache of every layer
    (at 19M parameters, 256 sequences, that copy was a third of the decode). This one writes each step's keys
    and values into the reserved room and gives attention a view of the filled part; past the reserve it
    grows (doubling what it holds), so a longer run only copies, it never fails.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, reserve: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._length = keys.shape[-2]
        self._keys, self._values = _with_room(keys, reserve), _with_room(values, reserve)
        self.keys, self.values = self._keys[..., : self._length, :], self._values[..., : self._length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Write ``[B, H, T, D]`` new keys and values after the held ones; returns views of all of them."""
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._keys = _with_room(self.keys, end)
            self._values = _with_room(self.values, end)
        self._keys[..., self._length : end, :] = key_states
        self._values[..., self._length : end, :] = value_states
        self._length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values


def _with_room(states: torch.Tensor, reserve: int) -> torch.Tensor:
    """A ``[B, H, T + reserve, D]`` buffer holding ``states`` ``[B, H, T, D]`` in its first T positions."""
    batch, heads, length, dim = states.shape
    buffer = states.new_empty(batch, heads, length + max(reserve, 1), dim)
    buffer[..., :length, :] = states
    return buffer


def reserve_room(cache: DynamicCache, tokens: int) -> DynamicCache:
    """``cache`` with each plain full-attention layer given room for ``tokens`` more in place (sliding-window
    layers, e.g. Gemma 3's, keep transformers' own handling)."""
    cache.layers = [
        ReservedLayer(layer.keys, layer.values, tokens) if type(layer) is DynamicLayer and layer.is_initialized
        else layer
        for layer in cache.layers
    ]  # fmt: skip
    return cache
