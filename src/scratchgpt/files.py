"""Hashing files, and writing them so that no reader ever sees half of one.

Shared by the corpus and token caches (text.py, data.py) and by checkpoints (checkpoint.py).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(target: Path, payload: bytes) -> None:
    """Replace `target` with `payload` in one rename: a crash, or a power cut, leaves the old file or the new one,
    never a part. The bytes reach the disk (fsync) before the rename, and the rename before this returns."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (where the system lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable on NTFS
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_once(target: Path, payload: bytes) -> None:
    """Create `target` with `payload` unless another process already did (the first writer wins)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        try:
            os.link(tmp, target)  # unlike a rename, a link fails if `target` exists
        except FileExistsError:
            pass
    finally:
        Path(tmp).unlink(missing_ok=True)
