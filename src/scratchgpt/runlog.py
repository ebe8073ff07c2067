"""TensorBoard for a run (`train --tensorboard`): every row of metrics.jsonl, and the samples, as events.

metrics.jsonl stays the run's record (loss.png and `scratchgpt plot` read it); with
`--tensorboard` each row is also written under RUN/tensorboard, one scalar per number, named
by the row's kind (`train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_second`,
`eval/val_loss`, ...), and each evaluation's sample as text. A resumed run drops the events
past its step, as it drops those rows from metrics.jsonl, so the curves do not fork.

    tensorboard --logdir runs/        # every run under runs/ side by side
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import ScratchGPTError

EVENTS_DIR = "tensorboard"


class TensorBoardLog:
    """A run's TensorBoard event files, written as its metrics rows arrive."""

    def __init__(self, run_dir: Path, purge_after: int | None = None):
        """`purge_after`: a resumed run's step; its events after that step are dropped (metrics.jsonl keeps the
        rows up to and including it)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ScratchGPTError("--tensorboard needs the tensorboard package: pip install 'scratchgpt[tensorboard]'") from None
        self.writer = SummaryWriter(str(run_dir / EVENTS_DIR), purge_step=None if purge_after is None else purge_after + 1)

    def row(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row: each finite number in it, as a scalar at the row's step."""
        kind, step = row.get("kind", "train"), int(row["step"])
        for name, value in row.items():
            if name not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{name}", value, step)

    def sample(self, step: int, text: str) -> None:
        self.writer.add_text("sample", text, step)

    def close(self) -> None:
        self.writer.close()
