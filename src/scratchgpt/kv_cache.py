"""The keys and values a decoding model keeps, so that each new token costs one position's work."""

from __future__ import annotations

import torch
import torch.nn as nn


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated for block_size positions.

    `length` tokens are cached; the next token fed to the model sits at position `length`.
    Each layer writes its new keys and values in place and attends over all cached ones.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, block_size: int, head_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_head, block_size, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int = 1) -> KVCache:
        """An empty cache for `batch_size` sequences of up to block_size tokens, on the model's device and dtype."""
        weight = model.transformer.wte.weight
        c = model.config
        return cls(c.n_layer, batch_size, c.n_head, c.block_size, c.head_size, weight.device, weight.dtype)

    @property
    def batch_size(self) -> int:
        return self.keys.size(1)

    def reset(self) -> None:
        """Forget every cached position (the memory stays allocated)."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new (B, nh, T, hs) keys and values; return all of them, (B, nh, length + T, hs)."""
        start, end = self.length, self.length + k.size(2)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def repeat(self, n: int) -> KVCache:
        """A cache of n copies of this batch-1 cache: one prompt's prefill shared by n continuations."""
        if self.batch_size != 1:
            raise ValueError(f"only a batch-1 cache can be repeated, this one holds {self.batch_size}")
        n_layer, _, n_head, block_size, head_size = self.keys.shape
        copy = KVCache(n_layer, n, n_head, block_size, head_size, self.keys.device, self.keys.dtype)
        copy.keys.copy_(self.keys.expand_as(copy.keys))  # (L, 1, nh, T, hs) -> (L, n, nh, T, hs)
        copy.values.copy_(self.values.expand_as(copy.values))
        copy.length = self.length
        return copy
