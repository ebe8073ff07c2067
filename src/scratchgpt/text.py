"""Finding and reading the training text: the files `--data` names, joined into one corpus.

Files are decoded a chunk at a time, and one that is not text is refused with its byte offset.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .files import atomic_write_bytes, sha256_of

# Tiny Shakespeare, from karpathy/char-rnn (data/tinyshakespeare/input.txt); a gzipped copy ships in corpora/.
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# What a directory contributes: files with these suffixes (prose, markup, data and source code).
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .org .adoc .tex .csv .tsv .json .jsonl .xml .html .htm .yaml .yml .toml "
    ".ini .cfg .py .js .ts .c .h .cc .cpp .hpp .java .go .rs .rb .sh .sql .css .lua .r .jl .hs .ml .swift .kt".split()
)
FILE_SEPARATOR = "\n\n"  # between consecutive files: a paragraph break, which every tokenizer can encode
READ_CHUNK = 1 << 20  # bytes read (and characters decoded) at a time


def cache_dir() -> Path:
    """Where downloads and encoded token arrays live: $SCRATCHGPT_CACHE or ~/.cache/scratchgpt."""
    return Path(os.environ.get("SCRATCHGPT_CACHE") or Path.home() / ".cache" / "scratchgpt")


def tiny_shakespeare_path() -> Path:
    """Tiny Shakespeare as a plain file in the cache, unpacked from the package's copy on first use.

    The package ships the text gzip-compressed (`corpora/`), so the first run works offline;
    both the packaged bytes and the cached file are checked against the known SHA-256.
    """
    target = cache_dir() / "tinyshakespeare" / "input.txt"
    if target.is_file() and sha256_of(target) == TINY_SHAKESPEARE_SHA256:
        return target
    packaged = resources.files("scratchgpt") / "corpora" / "tinyshakespeare.txt.gz"
    try:
        payload = gzip.decompress(packaged.read_bytes())
    except (OSError, EOFError) as exc:
        raise DataError(f"the packaged Tiny Shakespeare ({packaged}) cannot be read ({exc}); reinstall scratchgpt "
                        "or pass --data PATH to a copy of the text") from None
    if hashlib.sha256(payload).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"the packaged Tiny Shakespeare ({packaged}) has the wrong SHA-256; reinstall scratchgpt "
                        "or pass --data PATH to a copy of the text")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, payload)
    return target


# ---------------------------------------------------------------------------------------------
# Finding the files


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_text_files(root: Path) -> tuple[list[Path], int]:
    """Text files under `root` sorted by relative path, and how many other files were passed over."""
    found, ignored = [], 0
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]  # .git, .venv, ...
        for name in filenames:
            if _is_hidden(name):
                continue
            if Path(name).suffix.lower() in TEXT_SUFFIXES:
                found.append(Path(folder) / name)
            else:
                ignored += 1
    # Sorting by path components (not by the joined string) keeps "a/b" before "a-c" on every OS.
    found.sort(key=lambda p: p.relative_to(root).parts)
    return found, ignored


def find_corpus_files(spec: str | None) -> tuple[list[Path], str]:
    """The files `--data` names, in corpus order, and a short description of where they came from.

    One file, every text file under a directory (recursively, sorted by path, hidden files and
    folders left out), or a glob; with no `--data`, Tiny Shakespeare. The files, joined in that
    order with FILE_SEPARATOR between them, are the corpus.
    """
    if not spec:
        path = tiny_shakespeare_path()
        return [path], str(path)
    p = Path(spec).expanduser()
    if p.is_file():
        return [p], str(p)
    if p.is_dir():
        files, ignored = _walk_text_files(p)
        if not files:
            raise DataError(
                f"directory {p} holds no text files ({ignored} other file(s); text means one of "
                f"{', '.join(sorted(TEXT_SUFFIXES)[:8])}, ...); pass --data 'DIR/**/*.EXT' as a glob to choose files yourself"
            )
        return files, str(p)
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [m for m in matches if m.is_file()]  # glob's wildcards already pass over hidden names
        if not files:
            raise DataError(f"--data {spec!r} matches no files; check the pattern (quote it so the shell does not expand it)")
        return files, spec
    if p.exists():
        raise DataError(f"data path {p} is neither a file nor a directory; pass --data a text file, a directory or a glob")
    raise DataError(f"data file {p} does not exist; pass --data a UTF-8 text file, a directory of text files, or a glob")


# ---------------------------------------------------------------------------------------------
# Reading text: decoded a chunk at a time, refusing what is not text


class BadFileError(DataError):
    """A file of the corpus is not text in the expected encoding."""

    def __init__(self, path: Path, offset: int, problem: str, encoding: str):
        self.path, self.offset, self.problem = path, offset, problem
        remedy = ("if it is text in another encoding, pass --encoding NAME (for example --encoding latin-1 or cp1252); "
                  if problem.startswith("invalid") or problem.startswith("incomplete") else "")
        super().__init__(
            f"{path} is not {encoding} text: {problem} at byte offset {offset}; {remedy}"
            "pass --skip-bad-files to leave such files out of the corpus"
        )


def _codec(encoding: str) -> str:
    # A UTF-8 file may start with a byte-order mark (Windows editors write one); it is not text.
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def iter_file_text(path: Path, encoding: str = "utf-8", on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """The text of one file, a chunk at a time; bytes that are not valid text raise BadFileError."""
    decoder = codecs.getincrementaldecoder(_codec(encoding))(errors="strict")
    # In ASCII-compatible encodings a NUL byte is a NUL character: look for it before decoding,
    # so a binary file is reported as such, at its first NUL, rather than at its first invalid byte.
    ascii_nul = "\x00".encode(encoding) == b"\x00"
    fed = 0  # bytes handed to the decoder so far

    def decode(chunk: bytes, final: bool = False) -> str:
        if ascii_nul and (raw_nul := chunk.find(b"\x00")) >= 0:
            raise BadFileError(path, fed + raw_nul, "a NUL byte (the file looks binary)", encoding)
        base = fed - len(decoder.getstate()[0])  # the decoder may hold the start of a character back
        try:
            text = decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            problem = (f"incomplete character (byte 0x{exc.object[exc.start]:02x}) at the end of the file" if final
                       else f"invalid byte 0x{exc.object[exc.start]:02x}")
            raise BadFileError(path, base + exc.start, problem, encoding) from None
        nul = text.find("\x00")
        if nul >= 0:  # valid in UTF-8, but text files do not contain it: this is a binary file
            raise BadFileError(path, base + len(text[:nul].encode(encoding)), "a NUL byte (the file looks binary)", encoding)
        return text

    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            text = decode(chunk)
            fed += len(chunk)
            if on_bytes:
                on_bytes(len(chunk))
            if text:
                yield text
    tail = decode(b"", final=True)
    if tail:
        yield tail


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The whole file as text (for small files); a file that is not text is refused with the offending offset."""
    return "".join(iter_file_text(path, encoding))


def _progress(total: int, desc: str, enabled: bool | None) -> tqdm:
    # enabled=None: a bar only on a terminal, so logs and pipes stay clean
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if enabled is None else not enabled, dynamic_ncols=True, file=sys.stderr)


@dataclass
class Corpus:
    """The files of a corpus and how to read them; `text_pieces` yields the joined text in chunks."""

    files: list[Path]
    source: str
    encoding: str = "utf-8"
    skip_bad_files: bool = False
    progress: bool | None = None
    sizes: list[int] = field(init=False)  # bytes per file, read once

    def __post_init__(self) -> None:
        self.sizes = [f.stat().st_size for f in self.files]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def content_key(self, cache_format: int) -> str:
        """SHA-256 of every file's bytes, in order, with the settings that decide what text they make.

        `cache_format` is the version of the cache the key is for: a new one misses every old entry.
        """
        digest = hashlib.sha256(json.dumps([cache_format, _codec(self.encoding), self.skip_bad_files, FILE_SEPARATOR]).encode())
        with _progress(self.total_bytes, "hashing", self.progress if self.total_bytes > 1 << 26 else False) as bar:
            for path, size in zip(self.files, self.sizes, strict=True):
                digest.update(f"\x00{size}\x00".encode())
                with open(path, "rb") as f:
                    while chunk := f.read(READ_CHUNK):
                        digest.update(chunk)
                        bar.update(len(chunk))
        return digest.hexdigest()

    def text_pieces(self, included: list[int], desc: str, limit_chars: int | None = None) -> Iterator[str]:
        """The text of the `included` files joined by FILE_SEPARATOR, a chunk at a time (stopping after `limit_chars`)."""
        total = sum(self.sizes[i] for i in included)
        seen = 0
        with _progress(total, desc, self.progress) as bar:
            for n, index in enumerate(included):
                if n:
                    yield FILE_SEPARATOR
                    seen += len(FILE_SEPARATOR)
                for piece in iter_file_text(self.files[index], self.encoding, bar.update):
                    yield piece
                    seen += len(piece)
                    if limit_chars is not None and seen >= limit_chars:
                        return


@dataclass
class CorpusStats:
    """What one pass over the corpus learns: which files are text, how many characters, which ones."""

    included: list[int]  # indices of the files that make the corpus
    skipped: list[str]  # "path: reason" for the files left out
    n_chars: int
    chars: list[str]  # sorted distinct characters (the char tokenizer's vocabulary)

    def to_dict(self) -> dict[str, Any]:
        return {"included": self.included, "skipped": self.skipped, "n_chars": self.n_chars, "chars": self.chars}


def codepoints(piece: str) -> np.ndarray:
    """The code points of `piece` as an array, to index tables by character without a Python loop."""
    if piece.isascii():  # the common case, 4x less memory than UTF-32
        return np.frombuffer(piece.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)


def scan_corpus(corpus: Corpus, log: Callable[[str], None]) -> CorpusStats:
    """One pass over the corpus: check every file is text, count characters, collect the character set."""
    seen = np.zeros(0x110000, dtype=bool)  # every Unicode code point, so no dictionary is needed
    in_file = np.zeros(0x110000, dtype=bool)
    included, skipped, n_chars = [], [], 0
    with _progress(corpus.total_bytes, "reading", corpus.progress) as bar:
        for index, path in enumerate(corpus.files):
            file_chars = 0
            in_file[:] = False
            try:
                for piece in iter_file_text(path, corpus.encoding, bar.update):
                    in_file[codepoints(piece)] = True
                    file_chars += len(piece)
            except BadFileError as exc:
                if not corpus.skip_bad_files:
                    raise
                skipped.append(f"{path}: {exc.problem} at byte offset {exc.offset}")
                continue
            if file_chars:  # an empty file adds nothing, not even a separator
                included.append(index)
                n_chars += file_chars
                seen |= in_file
    if len(included) > 1:
        n_chars += len(FILE_SEPARATOR) * (len(included) - 1)
        seen[[ord(c) for c in FILE_SEPARATOR]] = True
    for line in skipped:
        log(f"skipped (not {corpus.encoding} text): {line}")
    chars = [chr(c) for c in np.flatnonzero(seen)]
    return CorpusStats(included, skipped, n_chars, chars)


