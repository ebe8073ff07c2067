"""Conversations ready to train on: rendered by the template, split, and drawn in batches.

A batch holds whole conversations, each padded to the longest in the batch. The targets are
the next tokens where the loss mask says the model must produce them, and -100 elsewhere
(cross-entropy's ignore_index): prompt tokens, role tokens and padding add nothing to the loss
or to the gradients. A conversation longer than the context (block_size + 1 tokens) is left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..device import tick
from ..errors import DataError
from ..evaluate import EvalResult, EvaluationStopped, bits_per_character, progress_bar
from ..text import find_corpus_files, read_text
from ..tokenizer import Tokenizer
from .conversations import read_conversations
from .tasks import Example, builtin_conversations
from .template import Message, Rendered, render

IGNORE = -100  # F.cross_entropy's default ignore_index


def batch_tensors(rendered: list[Rendered]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (B, T) for whole conversations, T the longest minus one; y is IGNORE off the mask."""
    length = max(len(r.ids) for r in rendered) - 1
    x = torch.zeros(len(rendered), length, dtype=torch.long)
    y = torch.full((len(rendered), length), IGNORE, dtype=torch.long)
    for row, r in enumerate(rendered):
        ids, learn = torch.tensor(r.ids), torch.tensor(r.mask)
        x[row, : len(ids) - 1] = ids[:-1]
        y[row, : len(ids) - 1] = torch.where(learn[1:], ids[1:], IGNORE)
    return x, y


class ConversationSampler:
    """Random batches of whole conversations, drawn with a seeded generator (so a resumed run sees the same ones).

    Under data parallelism every process draws the same global batch and keeps its own slice.
    """

    def __init__(self, conversations: list[Rendered], batch_size: int, seed: int, device: str | torch.device = "cpu",
                 rank: int = 0, world_size: int = 1):
        self.conversations = conversations
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self._global_batch = batch_size * world_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.conversations), (self._global_batch,), generator=self.generator)[self._mine]
        x, y = batch_tensors([self.conversations[int(i)] for i in picks])
        return x.to(self.device), y.to(self.device)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


@dataclass
class ChatData:
    """Rendered conversations per split, and the held-out task examples (built-in set only)."""

    tokenizer: Tokenizer
    train: list[Rendered]
    val: list[Rendered]
    source: str
    held_out: list[Example] = field(default_factory=list)
    left_out: int = 0  # conversations longer than the context

    @property
    def train_tokens(self) -> int:
        return sum(len(r.ids) for r in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(len(r.ids) for r in self.val)

    def sampler(self, split: str, block_size: int, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                world_size: int = 1) -> ConversationSampler:
        """Random batches of whole conversations from one split (each already fits `block_size`)."""
        return ConversationSampler(self.train if split == "train" else self.val, batch_size, seed, device, rank, world_size)

    @cached_property
    def _val_targets(self) -> tuple[int, int, int]:
        """(tokens, characters, bytes) the validation loss is taken over: the masked-in targets (counted once)."""
        ids = [i for r in self.val for i, learn in zip(r.ids[1:], r.mask[1:], strict=True) if learn]
        text = self.tokenizer.decode([i for i in ids if i < self.tokenizer.base_vocab_size])  # <|end|> is no text
        return len(ids), len(text), len(text.encode("utf-8"))

    def bits_per_char(self, loss_per_token: float) -> float:
        tokens, chars, _ = self._val_targets
        return bits_per_character(loss_per_token, tokens, chars)

    def bits_per_byte(self, loss_per_token: float) -> float:
        tokens, _, n_bytes = self._val_targets
        return bits_per_character(loss_per_token, tokens, n_bytes)

    def sample_prompt(self) -> list[int]:
        """The first validation conversation up to its first reply: what a sample during training answers."""
        first = self.val[0]
        return first.ids[: first.mask.index(True)]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device, batch_size: int = 32,
                 should_stop: Callable[[], bool] | None = None, progress: bool = False) -> EvalResult:
        """The loss over every masked-in target of every validation conversation."""
        was_training = model.training
        model.eval()
        total, batches = 0.0, range(0, len(self.val), batch_size)
        try:
            with progress_bar(len(batches), "full validation", progress) as bar:
                for start in batches:
                    if should_stop and should_stop():
                        raise EvaluationStopped
                    tick()
                    x, y = batch_tensors(self.val[start : start + batch_size])
                    logits, _ = model(x.to(device))
                    total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
                    bar.update(1)
        finally:
            model.train(was_training)
        tokens, chars, n_bytes = self._val_targets
        loss = total / tokens
        return EvalResult(loss, math.exp(loss), bits_per_character(loss, tokens, chars), tokens,
                          bits_per_character(loss, tokens, n_bytes), chars, n_bytes)


def _split(conversations: list[list[Message]], val_fraction: float) -> tuple[list, list]:
    """User files: the last `val_fraction` of the conversations validate (at least one, when there are two)."""
    n_val = min(len(conversations) - 1, max(1, round(len(conversations) * val_fraction)))
    if n_val < 1:
        raise DataError("fine-tuning needs at least two conversations: one to train on and one to validate")
    return conversations[:-n_val], conversations[-n_val:]


def _fits(conversations: list[list[Message]], tokenizer: Tokenizer, block_size: int) -> tuple[list[Rendered], int]:
    rendered = [render(c, tokenizer) for c in conversations]
    kept = [r for r in rendered if len(r.ids) <= block_size + 1 and any(r.mask[1:])]
    return kept, len(rendered) - len(kept)


def chat_data_from_config(data_config: DataConfig, tokenizer: Tokenizer, block_size: int,
                          log: Callable[[str], None] = print) -> ChatData:
    """The conversations `--data` names (JSONL), or the built-in set made from Tiny Shakespeare."""
    held: list[Example] = []
    if data_config.path:
        train, val = _split(read_conversations(data_config.path), data_config.val_fraction)
        source = data_config.path
    else:
        files, source = find_corpus_files(None)
        text = read_text(files[0])
        n_train = len(text) - round(len(text) * data_config.val_fraction)
        train, val, held = builtin_conversations(text, n_train)
        source = f"the built-in set (Shakespeare's dialogue and three small tasks, from {source})"
    train_r, dropped_train = _fits(train, tokenizer, block_size)
    val_r, dropped_val = _fits(val, tokenizer, block_size)
    if not train_r or not val_r:
        raise DataError(f"no conversation of {source} fits the model's context of {block_size} tokens "
                        f"({len(train)} train, {len(val)} val); use shorter conversations or a model with a longer context")
    if dropped_train + dropped_val:
        log(f"left out {dropped_train + dropped_val:,} conversation(s) longer than the context of {block_size} tokens")
    return ChatData(tokenizer, train_r, val_r, source, held, dropped_train + dropped_val)
