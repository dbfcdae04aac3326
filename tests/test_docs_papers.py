"""docs/papers.md, the page of the papers behind flatminima, and every reference to it.

The docs and the code cite the page's sections as "papers.md sec. N" (or "section N"). These tests keep the page's
numbered sections in place (1-5 the five seed papers in their fixed order, 6 the variants' papers), every such
reference on a section the page has, every mention of the page in docs/ a link that resolves to it (and to one of
its headings), and the repository free of paths that point outside it. Text only: nothing is imported or run.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE = DOCS / "papers.md"

# each numbered section, and a word its heading must contain (the first author, or what section 6 is)
SECTIONS = {1: "Foret", 2: "Bartlett", 3: "Luo", 4: "Ahn", 5: "Chen", 6: "variants"}

# "papers.md sec. 3", "papers.md section 2", "(papers.md, sec. 1)", "papers.md), sec. 4", "papers.md sec. 3 and 4"
MENTION = re.compile(r"papers\.md\)?,?\s+(?:sec\.|sections?)\s*(\d+)((?:\s*(?:,|and|or|to|-)\s*\d+)*)", re.IGNORECASE)
ANCHOR = re.compile(r"papers\.md#([\w-]+)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]*)\)")
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
# a path outside the repository: the shared folder beside it, or the machine's work folder (an absolute path,
# not a relative one that merely contains a folder of that name); spelled so that this file does not match itself
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.~-])/wor[k]/")

SCANNED_FOLDERS = ("src", "tests", "docs", "benchmarks", "examples")
SCANNED_FILES = (
    "README.md",
    "CHANGELOG.md",
    "mkdocs.yml",
    "pyproject.toml",
    "mkdocs_hooks.py",
    "MANIFEST.in",
    "CITATION.cff",
    "constraints.txt",
)
# build products and caches, which are not part of the repository (.gitignore)
SKIPPED_FOLDERS = {"__pycache__", "build", "dist", "runs", "site"}


def slug(title: str) -> str:
    """The anchor of a heading, as the docs' Markdown (the toc extension's default slugify) makes it."""
    value = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def headings(path: Path) -> list[tuple[int, str]]:
    """(level, text) of each Markdown heading of ``path``, outside fenced code blocks."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [(len(match.group(1)), match.group(2)) for match in HEADING.finditer(text)]


def anchors(path: Path) -> set[str]:
    return {slug(title) for _, title in headings(path)}


def numbered_sections() -> dict[int, str]:
    """Section number -> heading text of the page's ``## N. ...`` headings."""
    found: dict[int, str] = {}
    for level, title in headings(PAGE):
        match = re.match(r"(\d+)\. ", title)
        if level == 2 and match:
            assert int(match.group(1)) not in found, f"docs/papers.md numbers two sections {match.group(1)}"
            found[int(match.group(1))] = title
    return found


def text_files(*paths: Path) -> Iterator[Path]:
    """The text files under ``paths`` (files or folders), without caches, build products and hidden folders."""
    for path in paths:
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for candidate in candidates:
            parts = candidate.relative_to(ROOT).parts[:-1]
            if any(p in SKIPPED_FOLDERS or p.startswith(".") or p.endswith(".egg-info") for p in parts):
                continue
            if b"\0" in candidate.read_bytes()[:8192]:  # binary (figures, archives)
                continue
            yield candidate


def read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def blank(pattern: re.Pattern[str], text: str) -> str:
    """``text`` with each match of ``pattern`` replaced by spaces, its line breaks kept (so line numbers hold)."""
    return pattern.sub(lambda match: re.sub(r"[^\n]", " ", match.group(0)), text)


def line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def test_the_page_has_its_numbered_sections_in_order() -> None:
    assert PAGE.is_file(), "docs/papers.md is missing"
    sections = numbered_sections()
    assert sorted(sections) == list(sections), f"docs/papers.md's sections are out of order: {list(sections)}"
    for number, word in SECTIONS.items():
        assert number in sections, f"docs/papers.md has no section '## {number}. ...'"
        assert word.lower() in sections[number].lower(), (
            f"docs/papers.md section {number} is '{sections[number]}', which does not name '{word}': the sections "
            "are cited by number, so they keep their order"
        )
    for number in range(1, 6):  # each seed paper gives its arXiv link
        body = PAGE.read_text(encoding="utf-8").split(f"## {sections[number]}", 1)[1].split("\n## ", 1)[0]
        assert re.search(r"\(https://arxiv\.org/abs/\d{4}\.\d{4,5}\)", body), f"section {number} has no arXiv link"


def test_every_section_cited_exists() -> None:
    sections = numbered_sections()
    wrong = []
    for path in text_files(ROOT / "src", ROOT / "tests", DOCS):
        text = read(path)
        for match in MENTION.finditer(text):
            numbers = [int(match.group(1)), *map(int, re.findall(r"\d+", match.group(2)))]
            wrong += [
                f"{path.relative_to(ROOT)}:{line_of(text, match.start())}: section {n}"
                for n in numbers
                if n not in sections
            ]
    assert not wrong, "references to sections docs/papers.md does not have:\n" + "\n".join(wrong)


def test_every_anchor_into_the_page_exists() -> None:
    known = anchors(PAGE)
    wrong = []
    for path in text_files(ROOT / "src", ROOT / "tests", DOCS):
        text = read(path)
        wrong += [
            f"{path.relative_to(ROOT)}:{line_of(text, m.start())}: #{m.group(1)}"
            for m in ANCHOR.finditer(text)
            if m.group(1) not in known
        ]
    assert not wrong, "links to headings docs/papers.md does not have:\n" + "\n".join(wrong)


@pytest.mark.parametrize("page", sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")))
def test_the_docs_link_the_page_wherever_they_name_it(page: str) -> None:
    path = DOCS / page
    if path == PAGE or page.startswith("notes/"):  # the page itself; internal notes are not pages (mkdocs.yml)
        return
    text = blank(FENCE, path.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        file, _, anchor = target.partition("#")
        if not file.endswith("papers.md") or file.startswith(("http://", "https://")):
            continue
        assert (path.parent / file).resolve() == PAGE.resolve(), f"docs/{page} links {target}, not docs/papers.md"
        assert not anchor or anchor in anchors(PAGE), f"docs/{page} links {target}: docs/papers.md has no such heading"
    unlinked = blank(LINK, text)
    assert "papers.md" not in unlinked, (
        f"docs/{page}:{line_of(unlinked, unlinked.index('papers.md'))} names papers.md outside a link: link it, "
        "e.g. [papers.md sec. 1](papers.md#<the heading's anchor>)"
    )


def test_the_pages_own_links_resolve() -> None:
    text = blank(FENCE, PAGE.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        path = (PAGE.parent / file) if file else PAGE
        assert path.is_file(), f"docs/papers.md links a missing file: {target}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"docs/papers.md links {target}: no such heading there"


def test_nothing_points_outside_the_repository() -> None:
    paths = [ROOT / name for name in (*SCANNED_FOLDERS, *SCANNED_FILES) if (ROOT / name).exists()]
    wrong = []
    for path in text_files(*paths):
        text = read(path)
        wrong += [f"{path.relative_to(ROOT)}:{line_of(text, m.start())}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not wrong, "paths outside the repository (the project must not depend on them):\n" + "\n".join(wrong)


def test_docstrings_carry_no_sphinx_roles() -> None:
    """``help()`` shows docstrings as written: a ``:class:`~a.b.C``` role would show raw, so none is used."""
    role = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if role.search(line)
    ]
    assert not found, f"Sphinx roles in the source (write ``Name`` instead): {found[:10]}"
