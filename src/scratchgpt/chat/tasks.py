"""The built-in fine-tuning set, made from the packaged corpus, so that `scratchgpt sft` works offline.

Two kinds of conversation:

- **Shakespeare's dialogue.** Each speech is a user turn and the next speaker's speech is the
  assistant's reply. Pairs come from the training 90% of the text; the last 10% validates, the
  same split as pretraining.
- **Small tasks with checkable answers**, so that fine-tuning shows a measured gain:

      Spell horse backwards.      -> esroh
      How many letters in horse?  -> five
      What is two plus three?     -> five

  Words come from the corpus and every answer is written in letters, so a character model that
  only knows Shakespeare's characters can read and write them. About one word (and one sum) in
  ten never appears in training: `held_out` asks those, and `exact_match` scores the replies.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from .template import Message

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen twenty").split()
TASKS = ("backwards", "count", "add")
WORD_LENGTHS = (3, 8)  # shortest and longest word asked about
MAX_SPEECH_CHARS = 200  # longer dialogue turns cannot fit a small model's context with their reply


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str

    def conversation(self) -> list[Message]:
        return [Message("user", self.prompt), Message("assistant", self.answer)]


def _held_out(key: str) -> bool:
    """About one key in ten, the same on every machine: never in training, asked in evaluation."""
    return zlib.crc32(key.encode()) % 10 == 0


def task_examples(text: str, held_out: bool) -> list[Example]:
    """Every task example whose word (or sum) is in the held-out tenth (`held_out`) or not."""
    low, high = WORD_LENGTHS
    words = sorted({w for w in re.findall(r"[a-z]+", text) if low <= len(w) <= high})
    words = [w for w in words if _held_out(w) == held_out]
    examples = []
    for w in words:
        examples.append(Example("backwards", f"Spell {w} backwards.", w[::-1]))
        examples.append(Example("count", f"How many letters in {w}?", NUMBERS[len(w)]))
    for a in range(11):
        for b in range(11):
            if _held_out(f"{a}+{b}") == held_out:
                examples.append(Example("add", f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b]))
    return examples


def dialogue(text: str) -> list[list[Message]]:
    """(speech, reply) pairs of consecutive speeches by different speakers, as user and assistant turns."""
    speeches = []
    for block in text.split("\n\n"):
        name, _, speech = block.strip("\n").partition(":\n")
        if speech and name.isupper() and len(speech) <= MAX_SPEECH_CHARS:
            speeches.append((name, speech))
        else:
            speeches.append(None)  # a gap: the speeches either side of it are not a pair
    pairs = []
    for first, second in zip(speeches, speeches[1:], strict=False):
        if first and second and first[0] != second[0]:
            pairs.append([Message("user", first[1]), Message("assistant", second[1])])
    return pairs


def builtin_conversations(text: str, n_train_chars: int) -> tuple[list[list[Message]], list[list[Message]], list[Example]]:
    """(train conversations, val conversations, held-out task examples) from a corpus and its split point."""
    train_text, val_text = text[:n_train_chars], text[n_train_chars:]
    train_tasks = task_examples(train_text, held_out=False)
    held = task_examples(text, held_out=True)
    # Each sum is one example against thousands of words: repeat them so that adding is practised as often.
    adds = [e for e in train_tasks if e.task == "add"] * 20
    train = dialogue(train_text) + [e.conversation() for e in train_tasks + adds]
    val = dialogue(val_text) + [e.conversation() for e in held]
    return train, val, held


def is_correct(reply: str, answer: str) -> bool:
    """Exact match, forgiving only surrounding whitespace and a final full stop."""
    return reply.strip().rstrip(".").strip() == answer
