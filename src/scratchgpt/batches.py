"""Random training windows from a token array, `x = ids[i:i+T]` and `y = ids[i+1:i+T+1]`, drawn with
a seeded `torch.Generator` so that a run (and a resumed run) sees the same batches.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch

from .errors import DataError


class BatchSampler:
    """Random (x, y) windows of `block_size` tokens from one split, drawn with a seeded generator.

    Under data parallelism every process draws the same global batch of
    `batch_size * world_size` windows and keeps its own slice, so N processes see exactly the
    windows that one process with an N times larger batch would see.
    """

    def __init__(self, ids: np.ndarray, block_size: int, batch_size: int, seed: int, device: str | torch.device = "cpu",
                 rank: int = 0, world_size: int = 1):
        if len(ids) < block_size + 1:
            raise DataError(
                f"a split of {len(ids)} tokens is shorter than one window of block_size + 1 = {block_size + 1} tokens; "
                "use more text or a smaller --block-size"
            )
        self.ids = ids
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)
        self._mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self._global_batch = batch_size * world_size
        # A token file is read window by window rather than through its memory map: random
        # windows would map in (and count as resident) ever more of a large file over a run.
        self._file = open(ids.filename, "rb") if isinstance(ids, np.memmap) and isinstance(ids.base, mmap.mmap) else None

    def _read_windows(self, starts: np.ndarray) -> np.ndarray:
        if self._file is None:
            return self.ids[starts[:, None] + self._offsets]
        itemsize, length = self.ids.itemsize, self.block_size + 1
        fd = self._file.fileno()
        return np.stack([np.frombuffer(os.pread(fd, length * itemsize, self.ids.offset + int(s) * itemsize), dtype=self.ids.dtype)
                         for s in starts])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.ids) - self.block_size, (self._global_batch,), generator=self.generator).numpy()
        starts = starts[self._mine]
        windows = torch.from_numpy(self._read_windows(starts).astype(np.int64))  # (B, T+1)
        if self.device.type == "cuda":
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
