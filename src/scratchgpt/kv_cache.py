"""The keys and values a decoding model keeps, so that each new token costs one position's work."""

from __future__ import annotations

import torch
import torch.nn as nn


def _empty_for(cache_class, model: nn.Module, rows: int):
    """An empty cache of `rows` sequences shaped for `model`'s layers and heads, on its device and dtype."""
    weight, c = model.transformer.wte.weight, model.config
    return cache_class(c.n_layer, rows, c.n_head, c.block_size, c.head_size, weight.device, weight.dtype)


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
        self.attention_mask = None  # every query sees all cached keys and itself (see SlotCache for a mask)

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int = 1) -> KVCache:
        """An empty cache for `batch_size` sequences of up to block_size tokens, on the model's device and dtype."""
        return _empty_for(cls, model, batch_size)

    @property
    def batch_size(self) -> int:
        return self.keys.size(1)

    def reset(self) -> None:
        """Forget every cached position (the memory stays allocated)."""
        self.length = 0

    def advance(self, n: int) -> None:
        """The model has stored `n` more positions."""
        self.length += n

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


class SlotCache:
    """Keys and values for a fixed number of slots, each holding its own sequence with its own length.

    A batched server advances every running sequence in one forward pass of one fixed shape,
    (slots, 1), whatever the number of sequences, so that a row's arithmetic never depends on
    its neighbours: a seed gives the same text alone or beside fifteen others. Each slot has
    block_size positions plus a scratch one, where the idle slots of a step write.
    """

    def __init__(self, n_layer: int, slots: int, n_head: int, block_size: int, head_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, slots, n_head, block_size + 1, head_size)  # + 1: the scratch position
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # positions cached per slot
        self.prepare_step(torch.zeros(slots, dtype=torch.bool, device=device))

    @classmethod
    def for_model(cls, model: nn.Module, slots: int) -> SlotCache:
        """An empty cache of `slots` sequences for `model`, on its device and dtype."""
        return _empty_for(cls, model, slots)

    @property
    def slots(self) -> int:
        return self.keys.size(1)

    def prepare_step(self, stepping: torch.Tensor) -> None:
        """Set up the next one-token step: `stepping` (slots,) says which slots take part; the others idle."""
        self.stepping = stepping
        scratch = torch.full_like(self.lengths, self.block_size)
        self._write = torch.where(stepping, self.lengths, scratch)  # where each slot's new key goes
        self.length = torch.where(stepping, self.lengths, 0).view(-1, 1)  # each row's position, (slots, 1)
        key_positions = torch.arange(self.block_size + 1, device=self.lengths.device)  # (K,)
        own = (key_positions <= self.lengths[:, None]) & stepping[:, None]  # the slot's past and itself
        idle = (key_positions == self.block_size) & ~stepping[:, None]  # an idle row sees its scratch key only
        self.attention_mask = (own | idle).view(self.slots, 1, 1, -1)  # (slots, 1, 1, K), shared by the heads

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each slot's new (slots, nh, 1, hs) key and value at its own position; return all, (slots, nh, K, hs)."""
        rows = torch.arange(self.slots, device=k.device)
        self.keys[layer, rows, :, self._write] = k[:, :, 0]  # (slots, nh, hs) at (slot, :, position)
        self.values[layer, rows, :, self._write] = v[:, :, 0]
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        """The stepping slots have stored `n` more positions."""
        self.lengths += n * self.stepping

    def load(self, slot: int, cache: KVCache, row: int = 0) -> None:
        """Put row `row` of a prefilled KVCache into `slot`."""
        n = cache.length
        self.keys[:, slot, :, :n] = cache.keys[:, row, :, :n]
        self.values[:, slot, :, :n] = cache.values[:, row, :, :n]
        self.lengths[slot] = n
