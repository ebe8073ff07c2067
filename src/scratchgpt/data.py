"""From a text file to batches of token windows.

1. `resolve_text_path` finds the corpus: the user's `--data PATH`, or Tiny Shakespeare from
   the local cache, downloaded once from its canonical address and checked by SHA-256.
2. `prepare_dataset` splits the text by characters (first 90% train, last 10% validation, as
   nanoGPT and char-rnn do), encodes both splits, and stores the ids as compact uint8/uint16
   arrays in the cache, keyed by a hash of the text and the tokenizer. A second run memory-maps
   them instead of encoding again.
3. `BatchSampler` draws random windows `x = ids[i:i+T]`, `y = ids[i+1:i+T+1]` with an explicit,
   seeded `torch.Generator`, so a run (and a resumed run) sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .tokenizer import CharTokenizer, Tokenizer, tokenizer_from_dict

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def cache_dir() -> Path:
    """Where downloads and encoded token arrays live: $SCRATCHGPT_CACHE or ~/.cache/scratchgpt."""
    return Path(os.environ.get("SCRATCHGPT_CACHE") or Path.home() / ".cache" / "scratchgpt")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tiny_shakespeare_path(download: bool = True) -> Path:
    """The cached Tiny Shakespeare file, downloading and verifying it on first use."""
    target = cache_dir() / "tinyshakespeare" / "input.txt"
    if target.is_file() and sha256_of(target) == TINY_SHAKESPEARE_SHA256:
        return target
    if not download:
        raise DataError(f"Tiny Shakespeare is not cached at {target}; pass --data PATH to a local copy")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
            payload = response.read()
    except OSError as exc:
        raise DataError(
            f"could not download Tiny Shakespeare from {TINY_SHAKESPEARE_URL} ({exc}); "
            "pass --data PATH to a local copy of the text"
        ) from None
    if hashlib.sha256(payload).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"the file downloaded from {TINY_SHAKESPEARE_URL} has the wrong SHA-256; pass --data PATH instead")
    _atomic_write_bytes(target, payload)
    return target


def resolve_text_path(path: str | None) -> Path:
    """The user's file if given (it must exist), else the cached Tiny Shakespeare."""
    if not path:
        return tiny_shakespeare_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {p} does not exist; pass --data PATH to a UTF-8 text file")
    if not p.is_file():
        raise DataError(f"data path {p} is not a file; pass --data PATH to a UTF-8 text file")
    return p


def read_text(path: Path) -> str:
    """The whole file as text; a file that is not UTF-8 is refused with the offending offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it to UTF-8 first"
        ) from None


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """First (1 - val_fraction) of the characters train, the rest validate."""
    n_train = int(len(text) * (1.0 - val_fraction))
    return text[:n_train], text[n_train:]


def _id_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _atomic_write_bytes(target: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Dataset:
    """Both splits as token-id arrays (memory-mapped), with the counts needed for bits per character."""

    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    train_chars: int
    val_chars: int
    source: Path

    @property
    def val_chars_per_token(self) -> float:
        return self.val_chars / max(1, len(self.val_ids))


def prepare_dataset(path: str | None, val_fraction: float = 0.1, tokenizer: Tokenizer | None = None) -> Dataset:
    """Read, split and encode the corpus (or reuse the cached encoding of the same text).

    `tokenizer` is given when resuming or evaluating a checkpoint, whose vocabulary is fixed;
    otherwise a character tokenizer is built from the whole corpus, so that every validation
    character is known too.
    """
    source = resolve_text_path(path)
    text = read_text(source)
    train_text, val_text = split_text(text, val_fraction)
    if not train_text or not val_text:
        raise DataError(f"{source} holds {len(text)} characters: too few to split into training and validation text")
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(text)
    key_material = json.dumps([hashlib.sha256(text.encode("utf-8")).hexdigest(), val_fraction, tokenizer.to_dict()], ensure_ascii=False)
    key = hashlib.sha256(key_material.encode("utf-8")).hexdigest()[:20]
    folder = cache_dir() / "tokens" / key
    meta_path = folder / "meta.json"
    dtype = _id_dtype(tokenizer.vocab_size)
    if not meta_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name, split in (("train", train_text), ("val", val_text)):
            ids = np.asarray(tokenizer.encode(split), dtype=dtype)
            _atomic_write_bytes(folder / f"{name}.bin", ids.tobytes())
        meta = {"dtype": dtype.name, "source": str(source), "tokenizer": tokenizer.to_dict(), "val_fraction": val_fraction}
        _atomic_write_bytes(meta_path, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    else:
        cached = json.loads(meta_path.read_text(encoding="utf-8"))
        assert tokenizer_from_dict(cached["tokenizer"]) == tokenizer, f"token cache {folder} is inconsistent"
    train_ids = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val_ids = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    return Dataset(tokenizer, train_ids, val_ids, len(train_text), len(val_text), source)


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

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.ids) - self.block_size, (self._global_batch,), generator=self.generator).numpy()
        starts = starts[self._mine]
        windows = torch.from_numpy(self.ids[starts[:, None] + self._offsets].astype(np.int64))  # (B, T+1)
        if self.device.type == "cuda":
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
