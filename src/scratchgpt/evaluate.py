"""Loss on a whole split, and the units it is reported in.

`evaluate_split` scores every position of a token array: consecutive, non-overlapping windows
of block_size tokens, each token predicted from the tokens before it in its window, the last
window shorter. Its mean cross-entropy is the figure `scratchgpt eval` reports, comparable
across runs because it does not depend on random sampling.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class EvalResult:
    val_loss: float  # mean cross-entropy in nats per token
    val_perplexity: float  # exp(val_loss)
    val_bpc: float  # bits per character: the loss in bits, spread over the characters the tokens cover
    val_tokens: int  # positions scored

    def to_dict(self) -> dict:
        return asdict(self)


def bits_per_character(loss_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Nats per token to bits per character: loss * tokens / characters / ln 2."""
    return loss_per_token * n_tokens / max(1, n_chars) / math.log(2)


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    ids: np.ndarray,
    n_chars: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Mean next-token loss over every position of `ids`, in windows of the model's block_size."""
    block_size = model.config.block_size
    device = torch.device(device)
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise ValueError("a split needs at least two tokens to be scored")
    data = torch.from_numpy(np.asarray(ids).astype(np.int64))
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    def summed_loss(starts: list[int], length: int) -> float:
        x = torch.stack([data[s : s + length] for s in starts]).to(device)  # (b, length)
        y = torch.stack([data[s + 1 : s + 1 + length] for s in starts]).to(device)
        with ctx:
            logits, _ = model(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()

    n_full = n_targets // block_size
    starts = [i * block_size for i in range(n_full)]
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, n_full, batch_size):
            total += summed_loss(starts[i : i + batch_size], block_size)
        if n_targets % block_size:  # the last, shorter window
            total += summed_loss([n_full * block_size], n_targets % block_size)
    finally:
        model.train(was_training)
    loss = total / n_targets
    return EvalResult(loss, math.exp(loss), bits_per_character(loss, len(ids), n_chars), n_targets)
