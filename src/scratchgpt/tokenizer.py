"""Tokenizers turn text into integer ids and back.

The character tokenizer is the textbook one: its vocabulary is the sorted set of characters
of the corpus, and each character is one token. It is saved as JSON next to every checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import TokenizerError


class CharTokenizer:
    """One token per character; the vocabulary is fixed when the tokenizer is built."""

    kind = "char"

    def __init__(self, chars: list[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("a character vocabulary must hold distinct single characters")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise TokenizerError(
                f"the text has {len(unknown)} character(s) the tokenizer does not know: {shown}; "
                "use only characters from the training text"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "chars": self.chars}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    if not isinstance(d, dict) or d.get("type") != "char" or not isinstance(d.get("chars"), list):
        raise TokenizerError(f"unsupported tokenizer description (type {d.get('type') if isinstance(d, dict) else None!r})")
    return CharTokenizer(d["chars"])


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_dict(), ensure_ascii=False), encoding="utf-8")


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return tokenizer_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from None
