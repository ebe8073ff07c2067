"""Tokenizers turn text into integer ids and back.

Three kinds share one small interface (`Tokenizer`: encode, decode, vocab_size, to_dict, kind):

- `CharTokenizer`, the textbook one: the vocabulary is the sorted set of the corpus's
  characters, one token each. Unknown characters are refused.
- `ByteTokenizer`: the 256 byte values of the UTF-8 encoding. Any text can be encoded; one
  character of a script beyond ASCII becomes two to four tokens.
- `BPETokenizer`: byte-level BPE (as in GPT-2) trained with Hugging Face `tokenizers`: frequent
  byte sequences become one token, so a token covers several characters on average.

Each is saved as JSON in a checkpoint's tokenizer.json:

    {"type": "char", "chars": ["\\n", " ", "!", ...]}
    {"type": "byte"}
    {"type": "bpe", "hf_tokenizer": {...the JSON of tokenizers.Tokenizer.to_str()...}}

A tokenizer may also carry special tokens after its own vocabulary (`"special_tokens": [...]`,
see `SpecialTokens`): the chat template's role tokens.

Byte-level ids can end in the middle of a UTF-8 character (a sample cut short, one token of a
stream), so `decode` replaces incomplete bytes with U+FFFD instead of failing; when streaming,
`engine.TextStream` holds them back until the character is complete.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import TokenizerError

TOKENIZER_KINDS = ("char", "byte", "bpe")


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer offers: text <-> ids, its size, and its JSON description."""

    kind: str
    special_tokens: tuple[str, ...]

    @property
    def vocab_size(self) -> int: ...

    @property
    def base_vocab_size(self) -> int: ...

    def special_id(self, name: str) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...

    def to_dict(self) -> dict[str, Any]: ...


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise TokenizerError(f"token id {bad[0]} is outside the vocabulary of {vocab_size} tokens")


class SpecialTokens:
    """Named tokens after a tokenizer's own vocabulary, such as the chat template's role tokens.

    They get the ids `base_vocab_size`, `base_vocab_size + 1`, ...; `encode` never produces
    them (it only knows the base vocabulary), so no text can turn into one: a user cannot type
    a role into a message. `decode` writes each as its name.
    """

    special_tokens: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.special_tokens)

    def special_id(self, name: str) -> int:
        if name not in self.special_tokens:
            raise TokenizerError(f"the tokenizer has no special token {name!r} (it has {list(self.special_tokens) or 'none'})")
        return self.base_vocab_size + self.special_tokens.index(name)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        _check_ids(ids, self.vocab_size)
        base, pieces, run = self.base_vocab_size, [], []
        for i in ids:
            if int(i) < base:
                run.append(int(i))
                continue
            if run:
                pieces.append(self._base_bytes(run))
                run = []
            pieces.append(self.special_tokens[int(i) - base].encode("utf-8"))
        if run:
            pieces.append(self._base_bytes(run))
        return b"".join(pieces)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _base_bytes(self, ids: list[int]) -> bytes:
        raise NotImplementedError

    def _with_specials(self, d: dict[str, Any]) -> dict[str, Any]:
        return {**d, "special_tokens": list(self.special_tokens)} if self.special_tokens else d


def with_special_tokens(tokenizer: Tokenizer, names: Sequence[str]) -> Tokenizer:
    """A copy of `tokenizer` that also has the special tokens `names` (those it has already are kept in place)."""
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise TokenizerError("special tokens must be distinct, non-empty strings")
    copied = copy.copy(tokenizer)
    copied.special_tokens = tuple(tokenizer.special_tokens) + tuple(n for n in names if n not in tokenizer.special_tokens)
    return copied


class CharTokenizer(SpecialTokens):
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
    def base_vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            raise self.unknown_error(text) from None

    def unknown_error(self, text: str) -> TokenizerError:
        """The error for text holding characters outside the vocabulary, naming them."""
        unknown = sorted({c for c in text if c not in self.stoi})
        shown = ", ".join(repr(c) for c in unknown[:10])
        return TokenizerError(
            f"the text has {len(unknown)} character(s) the tokenizer does not know: {shown}; "
            "use only characters from the training text (or train with --tokenizer byte or bpe, which know every character)"
        )

    def _base_bytes(self, ids: list[int]) -> bytes:
        return "".join(self.chars[i] for i in ids).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return self._with_specials({"type": self.kind, "chars": self.chars})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars and other.special_tokens == self.special_tokens

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer(SpecialTokens):
    """One token per byte of the UTF-8 encoding: 256 symbols, never an unknown character."""

    kind = "byte"

    @property
    def base_vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _base_bytes(self, ids: list[int]) -> bytes:
        return bytes(ids)

    def to_dict(self) -> dict[str, Any]:
        return self._with_specials({"type": self.kind})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer) and other.special_tokens == self.special_tokens

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


def byte_level_alphabet() -> dict[int, str]:
    """The printable stand-in character for each byte, as GPT-2's byte-level BPE writes tokens.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 bytes (controls, space, soft hyphen) take the characters from
    U+0100 upwards, in byte order.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(0x100 + shifted)
            shifted += 1
    return table


def _mentions_byte_level(component: Any) -> bool:
    """Whether a pre-tokenizer description (possibly a Sequence of them) includes ByteLevel."""
    if isinstance(component, dict):
        if component.get("type") == "ByteLevel":
            return True
        return any(_mentions_byte_level(v) for v in component.values())
    if isinstance(component, list):
        return any(_mentions_byte_level(v) for v in component)
    return False


DEFAULT_BPE_VOCAB_SIZE = 1024


class BPETokenizer(SpecialTokens):
    """Byte-level BPE held in a Hugging Face `tokenizers.Tokenizer` (the `.hf` attribute)."""

    kind = "bpe"

    def __init__(self, hf: Any):
        import tokenizers

        if not isinstance(hf, tokenizers.Tokenizer):
            raise TokenizerError(f"BPETokenizer needs a tokenizers.Tokenizer, got {type(hf).__name__}")
        description = json.loads(hf.to_str())
        model_type = (description.get("model") or {}).get("type")
        if model_type != "BPE" or not _mentions_byte_level(description.get("pre_tokenizer")):
            raise TokenizerError(
                f"only byte-level BPE tokenizers are supported (model {model_type!r}, pre-tokenizer "
                f"{(description.get('pre_tokenizer') or {}).get('type')!r})"
            )
        self.hf = hf
        # Every id's bytes, for decoding without the HF decoder: byte-level token strings map
        # back through the alphabet; added tokens (such as GPT-2's <|endoftext|>) are plain text.
        to_byte = {ch: b for b, ch in byte_level_alphabet().items()}
        added = {token.content for token in hf.get_added_tokens_decoder().values()}
        self._token_bytes: list[bytes] = [b""] * hf.get_vocab_size(with_added_tokens=True)
        for token, index in hf.get_vocab(with_added_tokens=True).items():
            if token in added or any(ch not in to_byte for ch in token):
                self._token_bytes[index] = token.encode("utf-8")
            else:
                self._token_bytes[index] = bytes(to_byte[ch] for ch in token)

    @classmethod
    def from_hf(cls, hf: Any) -> BPETokenizer:
        """Wrap an existing byte-level BPE `tokenizers.Tokenizer` (for example GPT-2's)."""
        return cls(hf)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE, length: int | None = None) -> BPETokenizer:
        """Learn `vocab_size - 256` merges over the 256 byte symbols from an iterator of texts."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 256:
            raise TokenizerError(f"a byte-level BPE vocabulary needs at least the 256 byte symbols; got --vocab-size {vocab_size}")
        hf = HFTokenizer(models.BPE())
        # GPT-2's pre-tokenizer: split into words, numbers, punctuation and spaces, then map bytes
        # to printable characters. No prefix space, so that decode(encode(text)) == text.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(hf)

    @property
    def base_vocab_size(self) -> int:
        return len(self._token_bytes)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once, encoded in parallel by the Rust library."""
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def _base_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self._token_bytes[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return self._with_specials({"type": self.kind, "hf_tokenizer": json.loads(self.hf.to_str())})

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, BPETokenizer) and other.hf.to_str() == self.hf.to_str()
                and other.special_tokens == self.special_tokens)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its JSON description (see the module docstring for the formats)."""
    specials = d.get("special_tokens", []) if isinstance(d, dict) else []
    if not isinstance(specials, list):
        raise TokenizerError("a tokenizer's special_tokens must be a list of strings")
    return with_special_tokens(_base_from_dict(d), specials) if specials else _base_from_dict(d)


def _base_from_dict(d: dict[str, Any]) -> Tokenizer:
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "char" and isinstance(d.get("chars"), list):
        return CharTokenizer(d["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(d.get("hf_tokenizer"), dict):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(json.dumps(d["hf_tokenizer"]))
        except Exception as exc:  # the Rust library raises plain Exception on a malformed description
            raise TokenizerError(f"invalid BPE tokenizer description: {str(exc).splitlines()[0]}") from None
        return BPETokenizer(hf)
    raise TokenizerError(f"unsupported tokenizer description (type {kind!r}); expected one of {TOKENIZER_KINDS}")


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_dict(), ensure_ascii=False), encoding="utf-8")


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return tokenizer_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from None
