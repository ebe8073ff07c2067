"""The documentation keeps up with the code: every setting, every module, every command's examples."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest
from conftest import REPO

from scratchgpt.cli import build_parser
from scratchgpt.config import SECTIONS

TRAINING_DOC = REPO / "docs" / "training.md"
ARCHITECTURE_DOC = REPO / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*`(?P<name>\w+)`\s*\|\s*`(?P<default>[^`]*)`\s*\|(?P<why>.*)\|\s*$")


def documented_fields(markdown: str) -> dict[str, dict[str, tuple[str, str]]]:
    """{class name: {field: (default as written, explanation)}} from the tables under each '## ClassName'."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    section = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            tables.setdefault(section, {})
        elif section and (row := ROW.match(line)):
            tables[section][row["name"]] = (row["default"], row["why"].strip())
    return tables


@pytest.mark.parametrize("cls", list(SECTIONS.values()), ids=lambda cls: cls.__name__)
def test_every_config_field_is_documented_with_its_default(cls):
    tables = documented_fields(TRAINING_DOC.read_text(encoding="utf-8"))
    assert cls.__name__ in tables, f"docs/training.md needs a '## {cls.__name__}' section"
    rows = tables[cls.__name__]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert sorted(set(fields) - set(rows)) == [], f"fields of {cls.__name__} missing from docs/training.md"
    assert sorted(set(rows) - set(fields)) == [], f"docs/training.md documents fields {cls.__name__} no longer has"
    for name, (default, why) in rows.items():
        assert json.loads(default) == fields[name].default, f"docs/training.md gives {name} the default {default}"
        assert len(why) > 40, f"docs/training.md should say what {name} does and why"


def test_the_doc_parser_sees_a_wrong_default():
    doc = "## ModelConfig\n| field | default | why |\n|---|---|---|\n| `n_layer` | `5` | blocks stacked |\n"
    assert documented_fields(doc) == {"ModelConfig": {"n_layer": ("5", "blocks stacked")}}


def test_every_module_is_described_in_the_architecture_doc():
    text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    modules = sorted(p.name for p in (REPO / "src" / "scratchgpt").glob("*.py"))
    assert [name for name in modules if f"`{name}`" not in text] == []


def _commands(parser: argparse.ArgumentParser, prefix: str = "scratchgpt"):
    """(name, parser) for the program and every subcommand, nested ones included."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")


def test_every_command_help_shows_examples():
    commands = dict(_commands(build_parser()))
    assert {"scratchgpt export", "scratchgpt import", "scratchgpt presets", "scratchgpt bench train"} <= set(commands)
    missing = [name for name, parser in commands.items() if "examples:\n  scratchgpt" not in parser.format_help()]
    assert missing == []
