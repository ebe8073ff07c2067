"""Loss on a whole split, and the units it is reported in.

`evaluate_split` scores every position of a token array: consecutive, non-overlapping windows
of block_size tokens, each token predicted from the tokens before it in its window, the last
window shorter. Its mean cross-entropy is the figure `scratchgpt eval` reports, comparable
across runs because it does not depend on random sampling.

A loss per token cannot rank a character model against a BPE model (a BPE token covers
several characters), so the same total is also spread over the characters and the UTF-8 bytes
that the scored tokens cover: bits per character and bits per byte compare any two tokenizers
on the same text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .device import tick

PROGRESS_DELAY_SECONDS = 2.0  # an evaluation shows a progress bar only once it has lasted this long


class EvaluationStopped(Exception):
    """An evaluation was told to stop (Ctrl-C or SIGTERM during training) between two batches."""


@contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[tqdm]:
    """A bar for a long evaluation: it appears after PROGRESS_DELAY_SECONDS and vanishes when done."""
    # disable=None: on a terminal only, as the data bars, so logs and pipes stay clean
    bar = tqdm(total=total, desc=description, unit="batch", leave=False, delay=PROGRESS_DELAY_SECONDS,
               disable=None if enabled else True, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


@dataclass
class EvalResult:
    val_loss: float  # mean cross-entropy in nats per token
    val_perplexity: float  # exp(val_loss), per token
    val_bpc: float  # bits per character: the loss in bits, spread over the characters the scored tokens cover
    val_tokens: int  # positions scored
    val_bpb: float = float("nan")  # bits per UTF-8 byte of the same text
    val_chars: int = 0  # characters covered by the scored tokens
    val_bytes: int = 0  # UTF-8 bytes covered by the scored tokens

    def to_dict(self) -> dict:
        return asdict(self)


def bits_per_character(loss_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Nats per token to bits per character: loss * tokens / characters / ln 2 (bits per byte with bytes)."""
    return loss_per_token * n_tokens / max(1, n_chars) / math.log(2)


@torch.no_grad()
def _window_batches(n_targets: int, block_size: int, batch_size: int) -> list[tuple[list[int], int]]:
    """(window starts, window length) per batch: consecutive full windows, then the last, shorter one."""
    n_full = n_targets // block_size
    starts = [i * block_size for i in range(n_full)]
    batches = [(starts[i : i + batch_size], block_size) for i in range(0, n_full, batch_size)]
    if n_targets % block_size:
        batches.append(([n_full * block_size], n_targets % block_size))
    return batches


def evaluate_split(
    model: torch.nn.Module,
    ids: np.ndarray,
    n_chars: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    n_bytes: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
    description: str = "evaluating",
) -> EvalResult:
    """Mean next-token loss over every position of `ids`, in windows of the model's block_size.

    `n_chars` and `n_bytes` are the characters and bytes of text the scored tokens (all but
    the first) cover; they turn the loss into bits per character and per byte. Between two
    batches, a true `should_stop()` raises EvaluationStopped.
    """
    block_size = model.config.block_size
    device = torch.device(device)
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise ValueError("a split needs at least two tokens to be scored")
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    def summed_loss(starts: list[int], length: int) -> float:
        # Only this batch's windows are read from the (memory-mapped) ids and widened to int64.
        windows = torch.from_numpy(np.stack([np.asarray(ids[s : s + length + 1], dtype=np.int64) for s in starts]))
        x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)  # (b, length) each
        with ctx:
            logits, _ = model(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()

    batches = _window_batches(n_targets, block_size, batch_size)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with progress_bar(len(batches), description, progress) as bar:
            for batch_starts, length in batches:
                if should_stop and should_stop():
                    raise EvaluationStopped
                tick()
                total += summed_loss(batch_starts, length)
                bar.update(1)
    finally:
        model.train(was_training)
    loss = total / n_targets
    bpb = bits_per_character(loss, n_targets, n_bytes) if n_bytes is not None else float("nan")
    return EvalResult(loss, math.exp(loss), bits_per_character(loss, n_targets, n_chars), n_targets, bpb, n_chars, n_bytes or 0)
