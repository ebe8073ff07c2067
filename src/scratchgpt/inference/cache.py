"""The keys and values a decoding model keeps, so that each new token costs one position's work.

`KVCache` holds a fixed number of rows (sequences), each with its own length, preallocated for
block_size positions plus one scratch position. The model asks it three things, whatever it
holds: the positions of the tokens it is given (`positions`), which keys each query may see
(`mask`, None for the plain causal triangle), and where to put the new keys and values
(`update`); a model with a pair embedding also asks which token came before (`previous_tokens`).
The engine (engine.py) chooses what the next forward pass is:

- `prefill(rows, T)`: T tokens of a window, at positions 0..T-1, into the given rows; the
  queries see only each other (causal), so the model can use the fused causal kernel;
- `decode(active, span)`: one token for every row at once, shape (rows, 1), each at its own
  position, attending over the first `span` positions (the longest row's length + 1), so that
  a step costs what the rows hold, not what the cache could hold. Rows not `active` (free, or
  just prefilled) idle: they write to the scratch position and their output is never used.
  Each row sees only its own keys, so rows never mix: a request's arithmetic is the same
  alone or beside fifteen others.

After the forward pass the engine calls `advance()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


class KVCache:
    """Keys and values of every layer for `rows` sequences of up to block_size tokens, each with its own length."""

    def __init__(self, n_layer: int, rows: int, n_head: int, block_size: int, head_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (rows, n_head, block_size + 1, head_size)  # + 1: the scratch position
        self._hold([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)],
                   torch.zeros(rows, dtype=torch.long, device=device),  # positions cached per row
                   torch.zeros(rows, dtype=torch.long, device=device),  # each row's last token (bigram_embed)
                   block_size)
        self.decode(torch.zeros(rows, dtype=torch.bool, device=device))

    @classmethod
    def over(cls, state: Sequence[torch.Tensor], block_size: int) -> KVCache:
        """A cache over tensors that already hold its state, in `state()`'s order (an exported pass's inputs)."""
        lengths, last_tokens, *layers = state
        cache = cls.__new__(cls)
        cache._hold(layers[:len(layers) // 2], layers[len(layers) // 2:], lengths, last_tokens, block_size)
        return cache

    def _hold(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor,
              last_tokens: torch.Tensor, block_size: int) -> None:
        self.keys, self.values, self.lengths, self.last_tokens = list(keys), list(values), lengths, last_tokens
        self.block_size = block_size
        self.key_positions = torch.arange(block_size + 1, device=lengths.device)  # (K,): a decoding step reads [:span]
        self._row_index = torch.arange(lengths.numel(), device=lengths.device)  # (rows,): each row's own cache row
        self._spans: dict[int, torch.Tensor] = {}  # span -> key_positions[:span], made once

    @classmethod
    def for_model(cls, model: nn.Module, rows: int = 1) -> KVCache:
        """An empty cache of `rows` sequences shaped for `model`'s layers and heads, on its device and dtype.

        A model without attention layers (the bigram) gets a cache with no layers: only positions.
        """
        c = model.config
        weight = next(model.parameters())
        layers = c.n_layer if hasattr(model, "transformer") else 0
        return cls(layers, rows, c.n_head, c.block_size, c.head_size, weight.device, weight.dtype)

    @property
    def rows(self) -> int:
        return self.lengths.numel()

    def span_positions(self, span: int) -> torch.Tensor:
        """Positions 0..span-1 (span,): a compiled decoding step's input whose size is its span, one view per span,
        made once (a slice is a tensor operation, microseconds a token)."""
        if span not in self._spans:
            self._spans[span] = self.key_positions[:span]
        return self._spans[span]

    def state(self) -> list[torch.Tensor]:
        """The tensors that hold what the cache knows: lengths, last tokens, then each layer's keys and values."""
        return [self.lengths, self.last_tokens, *self.keys, *self.values]

    # --- what the next forward pass is ----------------------------------------------------------

    def prefill(self, rows: torch.Tensor, length: int) -> None:
        """The next pass is `length` tokens of a window for each of `rows` (r,): positions 0..length-1, causal."""
        self._mode, self._rows, self._length = "prefill", rows, length
        self.positions = torch.arange(length, device=rows.device).unsqueeze(0)  # (1, T), shared by the rows
        self.mask = None  # the causal triangle: the queries see only each other

    def decode(self, active: torch.Tensor, span: int | None = None) -> None:
        """The next pass is one token for every row (rows, 1); `active` (rows,) bool says which rows take part.

        `span`: the queries attend over positions 0..span-1 (at least the longest active row's length + 1;
        all block_size + 1 if not given).
        """
        self._mode, self.active = "decode", active
        self._span = self.block_size + 1 if span is None else span
        write = torch.where(active, self.lengths, self.block_size)[:, None]  # (rows, 1): an idle row writes to scratch
        self.positions = write.clamp(max=self.block_size - 1)  # (rows, 1); an idle row's position is never used
        # (rows, 1, 1, span): an active row sees 0..its length; an idle one its own old keys, to no use
        self.mask = (self.key_positions[:self._span] <= write).view(self.rows, 1, 1, self._span)
        self._write_at = write[:, 0]  # where each row's new key goes

    # --- what the model calls --------------------------------------------------------------------

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys and values (B, nh, T, hs); return the keys and values the queries attend over."""
        if self._mode == "prefill":  # the window starts at position 0: its own keys are all there is
            self.keys[layer][self._rows, :, :self._length] = k
            self.values[layer][self._rows, :, :self._length] = v
            return k, v
        self.keys[layer][self._row_index, :, self._write_at] = k[:, :, 0]  # (rows, nh, hs), each at its row's position
        self.values[layer][self._row_index, :, self._write_at] = v[:, :, 0]
        return self.keys[layer][:, :, :self._span], self.values[layer][:, :, :self._span]  # (rows, nh, span, hs), masked

    def previous_tokens(self, idx: torch.Tensor, none: int) -> torch.Tensor:
        """The token before each of idx (B, T), `none` for a window's first; remembers each row's last token."""
        if self._mode == "prefill":
            self.last_tokens[self._rows] = idx[:, -1]
            return torch.nn.functional.pad(idx[:, :-1], (1, 0), value=none)
        before = self.last_tokens[:, None].clone()  # (rows, 1): one token per row
        self.last_tokens.copy_(torch.where(self.active, idx[:, 0], self.last_tokens))  # idle rows keep theirs
        return before

    # --- after the pass ----------------------------------------------------------------------------

    def advance(self) -> None:
        """The pass is done: the prefilled rows hold their window, or each active row one more position."""
        if self._mode == "prefill":
            self.lengths[self._rows] = self._length
        else:
            self.lengths += self.active

    def copy_row(self, source: int, targets: torch.Tensor) -> None:
        """Give rows `targets` the cached positions of row `source`: one prompt's prefill shared by n samples."""
        for keys, values in zip(self.keys, self.values, strict=True):  # each layer's (rows, nh, K, hs)
            keys[targets] = keys[source].clone()
            values[targets] = values[source].clone()
        self.lengths[targets] = int(self.lengths[source])
        self.last_tokens[targets] = int(self.last_tokens[source])

    def free(self, rows: torch.Tensor) -> None:
        """Forget what `rows` hold (the memory stays allocated)."""
        self.lengths[rows] = 0
