"""Conversations as data: JSONL files in OpenAI's shape, one conversation per line.

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

`--data` names one file, a folder (its .jsonl files) or a glob, like a corpus. A bad line is
refused with its file and line number; a conversation must hold at least one assistant turn,
since that is what fine-tuning learns.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from ..text import find_corpus_files
from .template import ChatError, Message, as_messages


def read_conversations(spec: str) -> list[list[Message]]:
    """Every conversation in the JSONL file(s) `spec` names, in file and line order."""
    if not Path(spec).expanduser().exists() and not any(ch in spec for ch in "*?["):
        raise DataError(f"conversation file {spec} does not exist; pass --data a .jsonl file (one {{\"messages\": [...]}} "
                        "per line), a folder of them, or a glob")
    files, where = find_corpus_files(spec)
    if Path(spec).expanduser().is_dir():
        files = [f for f in files if f.suffix.lower() == ".jsonl"]
        if not files:
            raise DataError(f"directory {where} holds no .jsonl files; conversations are JSONL, one {{\"messages\": [...]}} per line")
    conversations = []
    for path in files:
        conversations += _read_file(path)
    if not conversations:
        raise DataError(f"{where} holds no conversations; write one {{\"messages\": [...]}} object per line")
    return conversations


def _read_file(path: Path) -> list[list[Message]]:
    conversations = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as UTF-8 text: {exc}") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            conversations.append(parse_line(line, f"{path}:{number}"))
    return conversations


def parse_line(line: str, where: str) -> list[Message]:
    """One JSONL line as a conversation; errors name `where` (file:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); write one {{\"messages\": [...]}} object per line") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{where}: expected an object with a \"messages\" list")
    try:
        messages = as_messages(record["messages"], "messages")
    except ChatError as exc:
        raise DataError(f"{where}: {exc}") from None
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so there is nothing to learn from it")
    return messages
