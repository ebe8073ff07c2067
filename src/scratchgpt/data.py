"""From text files to batches of token windows, in bounded memory.

1. `find_corpus_files` turns `--data` into a list of files: one file, every text file under a
   directory (recursively, sorted by path, hidden files and folders left out), or a glob. With
   no `--data`, Tiny Shakespeare, unpacked from the package's compressed copy and checked by SHA-256.
   The files, joined in that order with a blank line ("\\n\\n") between them, are the corpus.
2. `prepare_dataset` splits the corpus by characters (first 90% train, last 10% validation, as
   nanoGPT and char-rnn do) and encodes both splits into uint8/uint16/uint32 token files in the
   cache. Text is read and encoded a chunk at a time, never held whole in memory; the token
   files are memory-mapped. They are keyed by a SHA-256 of the files' bytes and the tokenizer,
   so a second run only hashes the files and maps the arrays.
3. `BatchSampler` draws random windows `x = ids[i:i+T]`, `y = ids[i+1:i+T+1]` with an explicit,
   seeded `torch.Generator`, so a run (and a resumed run) sees the same batches.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from .config import DataConfig
from .errors import DataError, TokenizerError
from .tokenizer import (
    DEFAULT_BPE_VOCAB_SIZE,
    TOKENIZER_KINDS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    tokenizer_from_dict,
)

# Tiny Shakespeare, from karpathy/char-rnn (data/tinyshakespeare/input.txt); a gzipped copy ships in corpora/.
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# What a directory contributes: files with these suffixes (prose, markup, data and source code).
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .org .adoc .tex .csv .tsv .json .jsonl .xml .html .htm .yaml .yml .toml "
    ".ini .cfg .py .js .ts .c .h .cc .cpp .hpp .java .go .rs .rb .sh .sql .css .lua .r .jl .hs .ml .swift .kt".split()
)
FILE_SEPARATOR = "\n\n"  # between consecutive files: a paragraph break, which every tokenizer can encode
READ_CHUNK = 1 << 20  # bytes read (and characters decoded) at a time
BPE_TRAINING_CHARS = 32_000_000  # BPE learns its merges from at most this many characters of the training split
BPE_PIECE_CHARS = 1 << 16  # text per BPE encoder call, cut where its pre-tokenizer splits anyway
BPE_BATCH_PIECES = 4  # pieces encoded in parallel; the library's per-token bookkeeping makes larger batches costly
_CACHE_FORMAT = 2  # bump when the token files' layout or the corpus rules change


def cache_dir() -> Path:
    """Where downloads and encoded token arrays live: $SCRATCHGPT_CACHE or ~/.cache/scratchgpt."""
    return Path(os.environ.get("SCRATCHGPT_CACHE") or Path.home() / ".cache" / "scratchgpt")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    _atomic_write_bytes(target, payload)
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
    """The files `--data` names, in corpus order, and a short description of where they came from."""
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

    def content_key(self) -> str:
        """SHA-256 of every file's bytes, in order, with the settings that decide what text they make."""
        digest = hashlib.sha256(json.dumps([_CACHE_FORMAT, _codec(self.encoding), self.skip_bad_files, FILE_SEPARATOR]).encode())
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


def _codepoints(piece: str) -> np.ndarray:
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
                    in_file[_codepoints(piece)] = True
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


# ---------------------------------------------------------------------------------------------
# Encoding a split chunk by chunk, straight into its token file


def _id_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


# Where BPE's pre-tokenizer splits whatever comes around it: after a newline that ends a line of
# text and before a line that starts with text. Encoding pieces cut there gives the same ids as
# encoding the whole text at once.
_BPE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


class _SplitWriter:
    """Encodes one split's text chunk by chunk and appends the ids to its token file."""

    def __init__(self, tokenizer: Tokenizer, out: BinaryIO, dtype: np.dtype):
        self.tokenizer, self.out, self.dtype = tokenizer, out, dtype
        self.n_tokens = self.n_chars = self.n_bytes = 0
        self.first_token: int | None = None
        self._pending: list[str] = []  # BPE: text waiting for a cut point
        self._pending_chars = 0
        if isinstance(tokenizer, CharTokenizer):
            self._lookup = np.full(0x110000, -1, dtype=np.int64)  # code point -> id, -1 for unknown
            self._lookup[[ord(c) for c in tokenizer.chars]] = np.arange(tokenizer.vocab_size)

    def _write(self, ids: np.ndarray) -> None:
        if len(ids):
            if self.first_token is None:
                self.first_token = int(ids[0])
            self.out.write(ids.astype(self.dtype).tobytes())
            self.n_tokens += len(ids)

    def add(self, text: str) -> None:
        self.n_chars += len(text)
        self.n_bytes += len(text.encode("utf-8"))
        if isinstance(self.tokenizer, CharTokenizer):
            ids = self._lookup[_codepoints(text)]
            if (ids < 0).any():
                raise self.tokenizer.unknown_error(text)
            self._write(ids)
        elif isinstance(self.tokenizer, ByteTokenizer):
            self._write(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
        else:
            self._pending.append(text)
            self._pending_chars += len(text)
            if self._pending_chars >= BPE_BATCH_PIECES * BPE_PIECE_CHARS:
                self._encode_pending(final=False)

    def _encode_pending(self, final: bool) -> None:
        text = "".join(self._pending)
        pieces, start = [], 0
        while len(text) - start > BPE_PIECE_CHARS:
            window = text[start : start + 2 * BPE_PIECE_CHARS]
            cuts = [m.start() for m in _BPE_CUT.finditer(window, BPE_PIECE_CHARS // 2)]
            # No line break to cut at (one huge line): cut anyway; the ids still decode to the same text.
            cut = cuts[-1] if cuts else len(window)
            pieces.append(text[start : start + cut])
            start += cut
        rest = text[start:]
        if final:
            pieces.append(rest)
            rest = ""
        self._pending, self._pending_chars = ([rest], len(rest)) if rest else ([], 0)
        pieces = [p for p in pieces if p]
        assert isinstance(self.tokenizer, BPETokenizer)
        for first in range(0, len(pieces), BPE_BATCH_PIECES):
            for ids in self.tokenizer.encode_batch(pieces[first : first + BPE_BATCH_PIECES]):
                self._write(np.asarray(ids, dtype=np.int64))

    def finish(self) -> None:
        if self._pending:
            self._encode_pending(final=True)


def _bpe_training_texts(corpus: Corpus, stats: CorpusStats, n_train: int) -> Iterator[str]:
    """An evenly spread sample of at most BPE_TRAINING_CHARS characters from the training split."""
    every = max(1, math.ceil(n_train / BPE_TRAINING_CHARS))
    seen = 0
    for i, piece in enumerate(corpus.text_pieces(stats.included, "sampling for BPE", limit_chars=n_train)):
        piece = piece[: max(0, n_train - seen)]  # never a character of the validation split
        seen += len(piece)
        if i % every == 0:
            # Small strings: the trainer reads the iterator hundreds of items ahead, so 1 MB items
            # would hold hundreds of megabytes of text in memory at once.
            for start in range(0, len(piece), 1 << 16):
                yield piece[start : start + (1 << 16)]


def _train_bpe(corpus: Corpus, stats: CorpusStats, n_train: int, vocab_size: int, key: str,
               log: Callable[[str], None]) -> BPETokenizer:
    """The BPE tokenizer learned on this corpus's training split, trained once and cached."""
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{key[:24]}.json"
    if not path.is_file():
        log(f"training a byte-level BPE tokenizer ({vocab_size} tokens) on the training split")
        tokenizer = BPETokenizer.train(_bpe_training_texts(corpus, stats, n_train), vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_once(path, json.dumps(tokenizer.to_dict(), ensure_ascii=False).encode("utf-8"))
    # Read back what is on disk: if processes raced, all of them use the same file.
    return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))  # type: ignore[return-value]


def _atomic_write_bytes(target: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_once(target: Path, payload: bytes) -> None:
    """Create `target` with `payload` unless another process already did (the first writer wins)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The dataset


@dataclass
class Dataset:
    """Both splits as token-id arrays (memory-mapped), with the counts needed for bits per character and byte."""

    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    train_chars: int
    val_chars: int
    source: Path
    train_bytes: int = 0
    val_bytes: int = 0
    val_target_chars: int = 0  # characters of the validation split after its first token: what eval predicts
    val_target_bytes: int = 0
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def bits_per_char(self, loss_per_token: float) -> float:
        """A validation loss in nats per token as bits per character of the validation text."""
        return loss_per_token * (len(self.val_ids) - 1) / max(1, self.val_target_chars) / math.log(2)

    def bits_per_byte(self, loss_per_token: float) -> float:
        """A validation loss in nats per token as bits per UTF-8 byte of the validation text."""
        return loss_per_token * (len(self.val_ids) - 1) / max(1, self.val_target_bytes) / math.log(2)

    def require_windows(self, block_size: int) -> None:
        """Refuse a corpus too small for one window of `block_size + 1` tokens in each split."""
        need = block_size + 1
        if len(self.train_ids) < need or len(self.val_ids) < need:
            raise DataError(
                f"{self.source} is too small: {self.train_chars + self.val_chars:,} characters make "
                f"{len(self.train_ids):,} training and {len(self.val_ids):,} validation tokens, but each split needs "
                f"at least one window of block_size + 1 = {need} tokens; use more text or a smaller --block-size"
            )


def _default_log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def prepare_dataset(
    path: str | None,
    val_fraction: float = 0.1,
    tokenizer: Tokenizer | None = None,
    *,
    kind: str = "char",
    vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
    encoding: str = "utf-8",
    skip_bad_files: bool = False,
    block_size: int | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> Dataset:
    """Read, split and encode the corpus `path` names (or reuse the cached encoding of the same text).

    `tokenizer` is given when resuming or evaluating a checkpoint, whose vocabulary is fixed;
    otherwise one of `kind` ("char", "byte", "bpe") is built: the character vocabulary from the
    whole corpus, so that every validation character is known too; BPE from the training split.
    With `block_size`, a corpus too small for one window per split is refused.
    """
    log = log or _default_log
    if tokenizer is None and kind not in TOKENIZER_KINDS:
        raise DataError(f"unknown tokenizer {kind!r}; choose one of {TOKENIZER_KINDS}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r}; pass --encoding with a Python codec name such as utf-8, latin-1 or cp1252") from None
    files, source = find_corpus_files(path)
    corpus = Corpus(files, source, encoding, skip_bad_files, progress)
    content_key = corpus.content_key()

    # Pass 1 (once per corpus): check the files are text, count characters, collect them.
    stats_path = cache_dir() / "corpus" / f"{content_key[:32]}.json"
    if stats_path.is_file():
        stats = CorpusStats(**json.loads(stats_path.read_text(encoding="utf-8")))
        for line in stats.skipped:
            log(f"skipped (not {encoding} text): {line}")
    else:
        stats = scan_corpus(corpus, log)
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(stats_path, json.dumps(stats.to_dict(), ensure_ascii=False).encode("utf-8"))
    total_bytes = sum(corpus.sizes[i] for i in stats.included)
    if stats.n_chars == 0:
        raise DataError(f"{source} holds no text: {len(files)} file(s), {corpus.total_bytes:,} bytes, 0 characters"
                        + (f" ({len(stats.skipped)} file(s) skipped as not text)" if stats.skipped else "")
                        + "; pass --data a file or directory with text in it")
    n_train = int(stats.n_chars * (1.0 - val_fraction))
    if n_train == 0 or n_train == stats.n_chars:
        raise DataError(f"{source} holds {stats.n_chars} characters ({total_bytes:,} bytes): too few to split into "
                        f"training and validation text (val_fraction {val_fraction}); use more text")

    if tokenizer is None:
        if kind == "char":
            tokenizer = CharTokenizer(stats.chars)
        elif kind == "byte":
            tokenizer = ByteTokenizer()
        else:
            tokenizer = _train_bpe(corpus, stats, n_train, vocab_size, f"{content_key}-{val_fraction}-{BPE_TRAINING_CHARS}", log)

    # Pass 2 (once per corpus and tokenizer): encode both splits into their token files.
    tokenizer_digest = hashlib.sha256(json.dumps(tokenizer.to_dict(), ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()
    key = hashlib.sha256(json.dumps([content_key, val_fraction, tokenizer_digest]).encode()).hexdigest()[:24]
    folder = cache_dir() / "tokens" / key
    dtype = _id_dtype(tokenizer.vocab_size)
    if not (folder / "meta.json").is_file():
        _encode_corpus(corpus, stats, n_train, tokenizer, dtype, folder, source, val_fraction)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    train_ids = np.memmap(folder / "train.bin", dtype=dtype, mode="r") if meta["train_tokens"] else np.zeros(0, dtype)
    val_ids = np.memmap(folder / "val.bin", dtype=dtype, mode="r") if meta["val_tokens"] else np.zeros(0, dtype)
    data = Dataset(tokenizer, train_ids, val_ids, meta["train_chars"], meta["val_chars"], Path(source),
                   meta["train_bytes"], meta["val_bytes"], meta["val_target_chars"], meta["val_target_bytes"],
                   [str(files[i]) for i in stats.included], stats.skipped)
    if block_size is not None:
        data.require_windows(block_size)
    return data


def _write_splits(corpus: Corpus, stats: CorpusStats, n_train: int, tokenizer: Tokenizer, dtype: np.dtype,
                  folder: Path) -> tuple[_SplitWriter, _SplitWriter, int]:
    """Stream the corpus once, sending the first `n_train` characters to train.bin and the rest to val.bin."""
    with open(folder / "train.bin", "wb") as train_file, open(folder / "val.bin", "wb") as val_file:
        train, val = _SplitWriter(tokenizer, train_file, dtype), _SplitWriter(tokenizer, val_file, dtype)
        seen = 0
        for piece in corpus.text_pieces(stats.included, f"tokenizing ({tokenizer.kind})"):
            cut = min(len(piece), max(0, n_train - seen))  # the split falls inside this piece, or not
            if cut:
                train.add(piece[:cut])
            if cut < len(piece):
                val.add(piece[cut:])
            seen += len(piece)
        train.finish()
        val.finish()
    return train, val, seen


def _encode_corpus(corpus: Corpus, stats: CorpusStats, n_train: int, tokenizer: Tokenizer, dtype: np.dtype,
                   folder: Path, source: str, val_fraction: float) -> None:
    """Encode both splits a chunk at a time into `folder`/{train,val}.bin, then write meta.json."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        try:
            train, val, seen = _write_splits(corpus, stats, n_train, tokenizer, dtype, tmp)
        except TokenizerError as exc:  # text outside a fixed (a checkpoint's) character vocabulary
            raise TokenizerError(f"{source}: {exc}") from None
        if seen != stats.n_chars:
            raise DataError(f"the files of {source} changed while they were read ({seen:,} characters now, "
                            f"{stats.n_chars:,} before); run again")
        first = tokenizer.decode_bytes([val.first_token]) if val.first_token is not None else b""
        meta = {
            "format": _CACHE_FORMAT, "dtype": dtype.name, "source": source, "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "val_fraction": val_fraction,
            "train_tokens": train.n_tokens, "val_tokens": val.n_tokens,
            "train_chars": train.n_chars, "val_chars": val.n_chars,
            "train_bytes": train.n_bytes, "val_bytes": val.n_bytes,
            # Eval predicts every validation token but the first: the text those targets cover.
            "val_target_chars": val.n_chars - len(first.decode("utf-8", errors="ignore")),
            "val_target_bytes": val.n_bytes - len(first),
        }
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not another process's finished copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dataset_from_config(data_config: DataConfig, tokenizer: Tokenizer | None = None, block_size: int | None = None,
                        progress: bool | None = None, log: Callable[[str], None] | None = None) -> Dataset:
    """`prepare_dataset` with the settings of a `DataConfig`."""
    return prepare_dataset(
        data_config.path or None, data_config.val_fraction, tokenizer, kind=data_config.tokenizer,
        vocab_size=data_config.vocab_size, encoding=data_config.encoding, skip_bad_files=data_config.skip_bad_files,
        block_size=block_size, progress=progress, log=log,
    )


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
