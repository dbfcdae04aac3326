"""The documented command lines cannot drift from the command line itself, and no flag goes undocumented.

Every fenced ```bash, ```sh, ```shell or ```console block in README.md and docs/ is read: lines continued with a
backslash are joined, comments dropped, and the commands split on ``&&``, ``||``, ``;``, ``|`` and ``&``. Each
command that runs flatminima (``flatminima ...``, ``python3 -m flatminima ...``, ``torchrun ... -m flatminima ...``,
possibly after ``NAME=value`` assignments) has its arguments parsed by the real parser; nothing is run, so
placeholders such as ``RUN/model.pt`` are fine. docs/cli.md must document every flag of every command, and its
"Every field" tables must list each ``TrainConfig`` field once, with its flag, YAML key and default.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flatminima.cli import _parser
from flatminima.train.config import _base_type, config_fields

ROOT = Path(__file__).resolve().parents[1]
CLI_PAGE = ROOT / "docs" / "cli.md"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def shell_blocks(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line number of the block's first line, language, lines) of each fenced shell block."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        language = (opening["info"].split() or [""])[0].lower()
        body: list[str] = []
        index += 1
        while index < len(lines):
            closing = FENCE.match(lines[index])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            body.append(lines[index][indent:] if lines[index][:indent].strip() == "" else lines[index])
            index += 1
        if language in SHELL_LANGUAGES:
            yield index - len(body) + 1, language, body
        index += 1


def logical_lines(first: int, language: str, body: list[str]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each command line, backslash continuations joined; console output is skipped."""
    pending: list[str] = []
    start = first
    for number, line in enumerate(body, first):
        if not pending:
            start = number
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1])
            continue
        yield start, " ".join([*pending, line])
        pending = []
    if pending:
        yield start, " ".join(pending)


def split_commands(line: str) -> list[list[str]]:
    """The words of each command on a line: comments dropped, split at the shell's command separators."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def flatminima_argv(words: list[str]) -> list[str] | None:
    """The arguments given to flatminima, or None if the command does not run flatminima."""
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return None
    program = Path(words[0]).name
    if program == "flatminima":
        return words[1:]
    if PYTHON.match(program) or program == "torchrun":
        for index in range(1, len(words) - 1):
            if words[index] == "-m":
                return words[index + 2 :] if words[index + 1] == "flatminima" else None
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    """("file:line: command", argv) of every flatminima command in a fenced shell block."""
    found = []
    for path in markdown_files():
        for first, language, body in shell_blocks(path.read_text()):
            for number, line in logical_lines(first, language, body):
                for words in split_commands(line):
                    argv = flatminima_argv(words)
                    if argv is not None:
                        where = f"{path.relative_to(ROOT)}:{number}: {shlex.join(words)}"
                        found.append((where, argv))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check() -> None:
    # a broken extraction would pass every test below by finding nothing
    assert len(COMMANDS) >= 20, COMMANDS
    assert any(argv[:1] == ["train"] for _, argv in COMMANDS)


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[where.split(": ")[0] for where, _ in COMMANDS])
def test_documented_command_parses(where: str, argv: list[str]) -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            _parser().parse_args(argv)
    except SystemExit as stop:  # --help and --version exit with 0
        if stop.code not in (0, None):
            pytest.fail(f"{where}\nis refused by flatminima's parser: {stderr.getvalue().strip()}")


def test_extraction() -> None:
    text = "\n".join(
        [
            "```bash",
            "RANK=0 python3 -m flatminima train --rho 0.1 \\",
            "    --epochs 2  # a comment with --bogus",
            'python3 -m pip install -e ".[dev]" && flatminima demo --quick; echo "a # b"',
            "torchrun --nproc-per-node 2 -m flatminima train --fsdp | tee log",
            "```",
            "  ```console",
            "  $ flatminima reproduce --list",
            "  sam-cycle  output, not a command",
            "  ```",
        ]
    )
    lines = [line for first, language, body in shell_blocks(text) for line in logical_lines(first, language, body)]
    assert [number for number, _ in lines] == [2, 4, 5, 8]
    commands = [flatminima_argv(words) for _, line in lines for words in split_commands(line)]
    assert [argv for argv in commands if argv is not None] == [
        ["train", "--rho", "0.1", "--epochs", "2"],
        ["demo", "--quick"],
        ["train", "--fsdp"],
        ["reproduce", "--list"],
    ]


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse keeps its subcommands in a private action; there is no public way to list them
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _mentioned(flag: str, text: str) -> bool:
    """Whether ``flag`` appears as a whole flag (``--p`` is not found in ``--progress``)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_every_flag_of_every_command_is_documented() -> None:
    text = CLI_PAGE.read_text()
    parser = _parser()
    missing = [
        f"{name} {flag}"
        for name, command in {"": parser, **_commands(parser)}.items()
        for action in command._actions
        for flag in action.option_strings
        if flag.startswith("--") and not _mentioned(flag, text)
    ]
    assert not missing, f"docs/cli.md does not mention: {', '.join(missing)}"


def _format_default(value: Any) -> str:
    """A default as the tables show it: YAML's spelling of booleans and None, floats without trailing zeros."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _field_rows() -> dict[str, list[str]]:
    """The rows of the tables under "## Every field" in docs/cli.md: YAML key -> its first three cells."""
    text = CLI_PAGE.read_text()
    match = re.search(r"^## Every field\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, 'docs/cli.md has no "## Every field" section'
    rows: dict[str, list[str]] = {}
    for line in match[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 4 or cells[0] in ("Flag", "---"):
            continue
        key = cells[1].strip("`")
        assert key not in rows, f"{key} has two rows in docs/cli.md"
        rows[key] = cells[:3]
    return rows


def test_every_field_has_a_row_with_its_flag_key_and_default() -> None:
    rows = _field_rows()
    fields = {field.name: field for field in config_fields()}  # every run's, then the variants' options
    assert set(rows) == set(fields), (
        f"Every field tables of docs/cli.md: missing {sorted(set(fields) - set(rows))}, "
        f"not fields {sorted(set(rows) - set(fields))}"
    )
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        flags = [flag, "--no-" + flag[2:]] if _base_type(field) is bool else [flag]
        flag_cell, _, default_cell = rows[name]
        assert re.findall(r"`([^`]*)`", flag_cell) == flags, f"{name}: the flag column should be {flags}"
        assert default_cell == f"`{_format_default(field.default)}`", f"{name}: the default is {field.default!r}"
