"""Choices measured once per machine and kept on disk: which dtype trains faster (dtype.py), which kernel
multiplies a decoding step's row faster (kernels.py).

Each kind of choice is one JSON file under the cache directory, a map from a key (a digest of what
the answer depends on: the CPU, torch, the thread count, ...) to an entry. A missing, damaged or
unreadable file is measured again, never an error; a read-only cache directory means measuring
again next time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from ..files import atomic_write_bytes
from ..text import cache_dir


def choice_key(described: dict) -> str:
    """A digest of what a choice depends on."""
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def choices_file(name: str) -> Path:
    return cache_dir() / name


def read_choices(name: str) -> dict:
    try:
        data = json.loads(choices_file(name).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def cached_choice(name: str, key: str, valid: Callable[[object], bool], measure: Callable[[], dict]
                  ) -> tuple[dict, bool]:
    """The entry kept under `key` in the file `name` if `valid` holds for it, else `measure()`'s, written back;
    and whether it was measured just now."""
    kept = read_choices(name)
    entry = kept.get(key)
    if valid(entry):
        return entry, False
    entry = kept[key] = measure()
    try:
        choices_file(name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(choices_file(name), json.dumps(kept, indent=1).encode())
    except OSError:
        pass  # a read-only cache: the next run measures again
    return entry, True
