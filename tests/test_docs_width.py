"""The docs' code fits the page: no line of a fenced code block in docs/*.md is longer than 88 characters.

Longer lines scroll sideways on the site and wrap badly when copied. Every fenced block counts (```python,
```bash, ```text, a bare ``` ...), opened by three or more backticks or tildes, indented or not. Prose and tables
are not code and are not checked; nor are the generated reports under docs/reproductions/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))  # not docs/reproductions/*/report.md, which are generated
WIDTH = 88
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


def code_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line inside a fenced code block, the block's indentation removed."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        index += 1
        if not opening:
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        while index < len(lines):
            closing = FENCE.match(lines[index])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break  # the same character, at least as many, nothing after it
            line = lines[index]
            yield index + 1, line[indent:] if line[:indent].strip() == "" else line
            index += 1
        index += 1  # the closing fence


def too_wide(text: str) -> list[tuple[int, int]]:
    """(line number, length) of each code line longer than WIDTH."""
    return [(number, len(line)) for number, line in code_lines(text) if len(line) > WIDTH]


def test_code_lines_are_found() -> None:
    wide = "x" * (WIDTH + 1)
    text = "\n".join(
        [
            wide,  # prose: not checked
            f"| {wide} |",  # a table: not checked
            "```python",
            "x" * WIDTH,  # exactly the limit: fine
            wide,
            "```",
            "    ~~~~ text",
            f"    {wide}",  # indented with its block: measured without the indentation
            "    ```",  # a shorter or other fence does not close it
            "    ~~~~",
            "```",
            "a",
            wide,  # an unlabelled block counts too
            "```",
        ]
    )
    assert [number for number, _ in code_lines(text)] == [4, 5, 8, 9, 12, 13]
    assert too_wide(text) == [(5, WIDTH + 1), (8, WIDTH + 1), (13, WIDTH + 1)]


def test_the_docs_have_code_to_check() -> None:
    # a broken extraction would pass the test below by finding nothing
    assert sum(1 for page in PAGES for _ in code_lines(page.read_text(encoding="utf-8"))) > 500


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_code_blocks_fit_in_88_columns(page: Path) -> None:
    wide = too_wide(page.read_text(encoding="utf-8"))
    where = ", ".join(f"{page.name}:{number} ({length})" for number, length in wide)
    assert not wide, f"code lines longer than {WIDTH} characters (wrap them): {where}"
