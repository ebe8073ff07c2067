"""The documentation keeps up with the code: every setting, every module, every command's examples."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import shlex

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
    package = REPO / "src" / "scratchgpt"
    modules = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py")
    assert [name for name in modules if f"**`{name}`**" not in text] == []
    # and the doc names no module that is gone (a renamed or moved file leaves its old name behind)
    named = {name for name in re.findall(r"(?<![/\w])((?:\w+/)?\w+\.py)\b", text)
             if name.split("/")[0] not in ("tests", "benchmarks") and name != "__init__.py"}
    known = set(modules) | {name.rsplit("/", 1)[-1] for name in modules}  # inside its folder's section, a short name
    assert sorted(named - known) == []


def _commands(parser: argparse.ArgumentParser, prefix: str = "scratchgpt"):
    """(name, parser) for the program and every subcommand, nested ones included."""
    yield prefix, parser
    for name, sub in parser.subcommands.items():
        yield from _commands(sub, f"{prefix} {name}")


def test_every_command_help_shows_examples():
    commands = dict(_commands(build_parser()))
    assert {"scratchgpt export", "scratchgpt import", "scratchgpt presets", "scratchgpt bench train"} <= set(commands)
    missing = [name for name, parser in commands.items() if "examples:\n  scratchgpt" not in parser.format_help()]
    assert missing == []


# ---------------------------------------------------------------------------------------------
# The front page and the docs pages: links that resolve, commands that parse

DOC_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
UNPARSEABLE = ("|", "<", ">", ";", "$(", "`")  # pipes, redirects, command lists, substitutions


def _prose(markdown: str) -> str:
    """The markdown without fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", markdown))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path) -> set[str]:
    headings = re.findall(
        r"^#{1,6}\s+(.+?)\s*$", FENCE.sub("", path.read_text(encoding="utf-8")), re.MULTILINE
    )
    return {_slug(h) for h in headings}


def relative_links(page) -> list[tuple[str, str]]:
    """(target as written, repository path) for every link in `page` to a file of this repository."""
    links = []
    for match in LINK.finditer(_prose(page.read_text(encoding="utf-8"))):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, and anchors within the same page
        path = (page.parent / target.split("#")[0]).resolve()
        links.append(
            (target, path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path))
        )
    return links


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_relative_link_points_at_a_file(page):
    broken = []
    for target, path in relative_links(page):
        if not (REPO / path).exists():
            broken.append(f"{target}: {path} does not exist")
        elif (
            "#" in target
            and path.endswith(".md")
            and target.split("#", 1)[1] not in _anchors(REPO / path)
        ):
            broken.append(f"{target}: {path} has no heading with that anchor")
    assert broken == []


def test_the_link_finder_skips_code_web_links_and_same_page_anchors(monkeypatch):
    page = REPO / "docs" / "example.md"
    monkeypatch.setattr(
        type(page),
        "read_text",
        lambda self, encoding=None: (
            "[ok](training.md) [up](../BENCHMARKS.md#large-corpora) [web](https://x.org) [here](#top) "
            "`[code](nowhere.md)`\n```bash\n[fenced](nowhere.md)\n```\n"
        ),
    )
    assert relative_links(page) == [
        ("training.md", "docs/training.md"),
        ("../BENCHMARKS.md#large-corpora", "BENCHMARKS.md"),
    ]
    assert _slug("Generation (KV cache)") == "generation-kv-cache"


def _shell_lines(markdown: str):
    """Each command line of the shell code blocks, `\\` continuations joined, a leading `$ ` dropped."""
    for block in FENCE.finditer(markdown):
        if block["lang"] not in SHELL_LANGS:
            continue
        for line in re.sub(r"\\\n\s*", " ", block["body"]).splitlines():
            yield line.strip().removeprefix("$ ")


def scratchgpt_commands(markdown: str) -> list[list[str]]:
    """The arguments after `scratchgpt` (or `-m scratchgpt`) of every command in the shell blocks.

    `&&` chains are split into their commands; a line with a pipe, a redirect or a substitution,
    which shlex cannot take apart as a shell would, is skipped. `# comments` are dropped.
    """
    commands = []
    for line in _shell_lines(markdown):
        for part in line.split("&&"):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            if any(mark in part.split(" #")[0] for mark in UNPARSEABLE) or not words:
                continue
            for i, word in enumerate(words):
                if word == "scratchgpt" and (i == 0 or words[i - 1] == "-m"):
                    commands.append(words[i + 1 :])
                    break
    return commands


def test_the_command_finder_reads_chains_continuations_and_comments():
    doc = (
        "```bash\npip install -e . && scratchgpt train && scratchgpt sample --seed 1  # a comment\n"
        "scratchgpt train --lr 3e-5 \\\n    --max-steps 5\n"
        "torchrun --standalone -m scratchgpt train --batch-size 6\n"
        "scratchgpt eval --json | jq .val_loss\n```\n"
        "```text\nscratchgpt train: error: a message\n```\n"
    )
    assert scratchgpt_commands(doc) == [
        ["train"],
        ["sample", "--seed", "1"],
        ["train", "--lr", "3e-5", "--max-steps", "5"],
        ["train", "--batch-size", "6"],
    ]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_documented_command_parses(page):
    parser = build_parser()
    failures = []
    for argv in scratchgpt_commands(page.read_text(encoding="utf-8")):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(argv)
        except SystemExit:
            failures.append(
                f"scratchgpt {shlex.join(argv)}: {stderr.getvalue().strip().splitlines()[-1:]}"
            )
    assert failures == []


def test_the_front_page_commands_keep_the_ci_contract():
    blocks = [b["body"] for b in FENCE.finditer((REPO / "README.md").read_text(encoding="utf-8"))]
    first, second = blocks[0], blocks[1]
    assert "../shared" not in first and "scratchgpt train" in first and "scratchgpt sample" in first
    ci_test_command = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert second.strip().endswith(ci_test_command), (
        "the README's test command must be the one .ci/run runs"
    )
