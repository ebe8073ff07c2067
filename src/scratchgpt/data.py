"""The token cache: both splits of the corpus, encoded once into memory-mapped token files.

Keyed by a SHA-256 of the text and the tokenizer, so a second run only hashes and maps them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from .batches import BatchSampler
from .config import DataConfig
from .errors import DataError, TokenizerError
from .evaluate import EvalResult, evaluate_split
from .files import atomic_write_bytes, write_once
from .text import Corpus, CorpusStats, cache_dir, codepoints, find_corpus_files, scan_corpus
from .tokenizer import (
    DEFAULT_BPE_VOCAB_SIZE,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    tokenizer_from_dict,
)

BPE_TRAINING_CHARS = 32_000_000  # BPE learns its merges from at most this many characters of the training split
BPE_PIECE_CHARS = 1 << 16  # text per BPE encoder call, cut where its pre-tokenizer splits anyway
BPE_BATCH_PIECES = 4  # pieces encoded in parallel; the library's per-token bookkeeping makes larger batches costly
_CACHE_FORMAT = 2  # bump when the token files' layout or the corpus rules (text.py) change


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
            self._lookup[[ord(c) for c in tokenizer.chars]] = np.arange(len(tokenizer.chars))

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
            ids = self._lookup[codepoints(text)]
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
        write_once(path, json.dumps(tokenizer.to_dict(), ensure_ascii=False).encode("utf-8"))
    # Read back what is on disk: if processes raced, all of them use the same file.
    return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))  # type: ignore[return-value]


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

    @property
    def train_tokens(self) -> int:
        return len(self.train_ids)

    @property
    def val_tokens(self) -> int:
        return len(self.val_ids)

    def sampler(self, split: str, block_size: int, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                world_size: int = 1) -> BatchSampler:
        """Random training windows of `block_size` tokens from one split."""
        ids = self.train_ids if split == "train" else self.val_ids
        return BatchSampler(ids, block_size, batch_size, seed=seed, device=device, rank=rank, world_size=world_size)

    def evaluate(self, model: torch.nn.Module, device: torch.device, batch_size: int = 32,
                 should_stop: Callable[[], bool] | None = None, progress: bool = False) -> EvalResult:
        """The loss over the whole validation split (what `scratchgpt eval` reports)."""
        return evaluate_split(model, self.val_ids, self.val_target_chars, batch_size=batch_size, device=device,
                              n_bytes=self.val_target_bytes, should_stop=should_stop, progress=progress,
                              description="full validation")

    def sample_prompt(self) -> list[int]:
        """Where a sample during training starts: a newline (or the first token, for text without one)."""
        try:
            return self.tokenizer.encode("\n")
        except TokenizerError:
            return [0]

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

    The split is by characters: the first 90% train, the last 10% validation, as nanoGPT and
    char-rnn do. Text is read and encoded a chunk at a time, never held whole in memory, into
    uint8/uint16/uint32 token files that are then memory-mapped.
    """
    log = log or _default_log
    # The settings follow DataConfig's rules, written once there (a ConfigError names the bad one).
    DataConfig(path=path or "", tokenizer=tokenizer.kind if tokenizer else kind, val_fraction=val_fraction,
               vocab_size=vocab_size, encoding=encoding, skip_bad_files=skip_bad_files)
    files, source = find_corpus_files(path)
    corpus = Corpus(files, source, encoding, skip_bad_files, progress)
    content_key = corpus.content_key(_CACHE_FORMAT)
    stats = _corpus_stats(corpus, content_key, log)
    n_train = _train_chars(corpus, stats, val_fraction)
    if tokenizer is None:
        if kind == "char":
            tokenizer = CharTokenizer(stats.chars)
        elif kind == "byte":
            tokenizer = ByteTokenizer()
        else:
            tokenizer = _train_bpe(corpus, stats, n_train, vocab_size, f"{content_key}-{val_fraction}-{BPE_TRAINING_CHARS}", log)
    data = _load_tokens(corpus, stats, n_train, tokenizer, content_key, val_fraction)
    if block_size is not None:
        data.require_windows(block_size)
    return data


def _corpus_stats(corpus: Corpus, content_key: str, log: Callable[[str], None]) -> CorpusStats:
    """Pass 1 (once per corpus): check the files are text, count characters, collect them."""
    stats_path = cache_dir() / "corpus" / f"{content_key[:32]}.json"
    if stats_path.is_file():
        stats = CorpusStats(**json.loads(stats_path.read_text(encoding="utf-8")))
        for line in stats.skipped:
            log(f"skipped (not {corpus.encoding} text): {line}")
        return stats
    stats = scan_corpus(corpus, log)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(stats_path, json.dumps(stats.to_dict(), ensure_ascii=False).encode("utf-8"))
    return stats


def _train_chars(corpus: Corpus, stats: CorpusStats, val_fraction: float) -> int:
    """How many characters, from the start, make the training split; a corpus too small to split is refused."""
    total_bytes = sum(corpus.sizes[i] for i in stats.included)
    if stats.n_chars == 0:
        raise DataError(f"{corpus.source} holds no text: {len(corpus.files)} file(s), {corpus.total_bytes:,} bytes, 0 characters"
                        + (f" ({len(stats.skipped)} file(s) skipped as not text)" if stats.skipped else "")
                        + "; pass --data a file or directory with text in it")
    n_train = int(stats.n_chars * (1.0 - val_fraction))
    if n_train == 0 or n_train == stats.n_chars:
        raise DataError(f"{corpus.source} holds {stats.n_chars} characters ({total_bytes:,} bytes): too few to split into "
                        f"training and validation text (val_fraction {val_fraction}); use more text")
    return n_train


def _load_tokens(corpus: Corpus, stats: CorpusStats, n_train: int, tokenizer: Tokenizer, content_key: str,
                 val_fraction: float) -> Dataset:
    """Pass 2 (once per corpus and tokenizer): encode both splits into their token files, then map them."""
    tokenizer_digest = hashlib.sha256(json.dumps(tokenizer.to_dict(), ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()
    key = hashlib.sha256(json.dumps([content_key, val_fraction, tokenizer_digest]).encode()).hexdigest()[:24]
    folder = cache_dir() / "tokens" / key
    dtype = _id_dtype(tokenizer.vocab_size)
    if (folder / "meta.json").is_file() and _damaged(folder, dtype):
        print(f"note: the token cache {folder} is damaged (a file cut short or unreadable); encoding again",
              file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    if not (folder / "meta.json").is_file():
        _encode_corpus(corpus, stats, n_train, tokenizer, dtype, folder, corpus.source, val_fraction)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    train_ids = np.memmap(folder / "train.bin", dtype=dtype, mode="r") if meta["train_tokens"] else np.zeros(0, dtype)
    val_ids = np.memmap(folder / "val.bin", dtype=dtype, mode="r") if meta["val_tokens"] else np.zeros(0, dtype)
    return Dataset(tokenizer, train_ids, val_ids, meta["train_chars"], meta["val_chars"], Path(corpus.source),
                   meta["train_bytes"], meta["val_bytes"], meta["val_target_chars"], meta["val_target_bytes"],
                   [str(corpus.files[i]) for i in stats.included], stats.skipped)


def _damaged(folder: Path, dtype: np.dtype) -> bool:
    """Whether a cached token folder disagrees with its meta.json: each split's file holds exactly its tokens."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        sizes = {name: (folder / f"{name}.bin").stat().st_size if meta[f"{name}_tokens"] else 0
                 for name in ("train", "val")}
        return any(sizes[name] != meta[f"{name}_tokens"] * np.dtype(dtype).itemsize for name in sizes)
    except (OSError, ValueError, KeyError, TypeError):
        return True


def _remove_stale_temporaries(parent: Path, name: str, older_than_s: float = 3600.0) -> None:
    """Temporary folders a killed encoding left behind (a live one is younger than an hour: left alone)."""
    now = time.time()
    for stale in parent.glob(f".{name}.tmp-*"):
        try:
            if now - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


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
    _remove_stale_temporaries(folder.parent, folder.name)
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

