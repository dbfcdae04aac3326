"""The README is the package's long description: on a package index every relative link would break, so every link
is absolute, and every absolute link into the project's own site or repository names a page, file and heading that
exist here. The project's addresses live in pyproject's ``[project.urls]``; mkdocs.yml and CITATION.cff agree.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_docs_papers import anchors  # tests/ is on sys.path: pytest's rootdir-less "prepend" import mode

ROOT = Path(__file__).resolve().parents[1]
# pyproject's [project.urls] table (read by pattern: tomllib is Python >= 3.11, and the project supports 3.10)
_TABLE = re.search(r"^\[project\.urls\]\n(.*?)(?=^\[|\Z)", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
URLS = dict(re.findall(r'^(\w+) = "([^"]+)"$', _TABLE.group(1), re.M))
SITE, REPO = URLS["Documentation"], URLS["Source"]
README = (ROOT / "README.md").read_text(encoding="utf-8")

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)  # [label]: target
HTML = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)", re.I)


def targets(text: str) -> list[str]:
    """Every link and image target of a Markdown text: inline, reference-style and HTML."""
    return [m.group(1) for pattern in (LINK, REFERENCE, HTML) for m in pattern.finditer(text)]


def site_page(url: str) -> tuple[Path, str]:
    """The file under docs/ that a page or file of the site is built from, and the anchor (or "")."""
    path, _, anchor = url.removeprefix(SITE).partition("#")
    if path.startswith("gallery/"):  # made by mkdocs_hooks.py: the index, and one page per examples/NAME.py
        name = path.removeprefix("gallery/").rstrip("/")
        return (ROOT / "examples" / f"{name}.py") if name else (ROOT / "mkdocs_hooks.py"), ""
    if path == "" or path.endswith("/"):
        stem = path.rstrip("/")
        page = ROOT / "docs" / (f"{stem}.md" if stem else "index.md")
        if stem and not page.exists():
            page = ROOT / "docs" / stem / "index.md"
        return page, anchor
    return ROOT / "docs" / path, anchor


def test_the_readme_has_links_to_check() -> None:
    found = targets(README)
    assert len(found) > 20, found  # the parser sees the links (a broken pattern would pass every check below)
    assert any(t.startswith(SITE) for t in found) and any(t.startswith(SITE) and t.endswith(".png") for t in found)


@pytest.mark.parametrize("target", sorted(set(targets(README))))
def test_every_readme_link_is_absolute_and_resolves(target: str) -> None:
    assert target.startswith("https://"), f"README.md links to {target!r}: use an absolute https address"
    if target.startswith(SITE):
        page, anchor = site_page(target)
        assert page.is_file(), f"README.md links to {target}, built from {page.relative_to(ROOT)}, which is missing"
        if anchor:
            assert anchor in anchors(page), f"README.md links to {target}: no heading #{anchor} there"
    elif target.startswith(REPO + "/blob/main/") or target.startswith(REPO + "/tree/main/"):
        path = ROOT / target.split("/main/", 1)[1].partition("#")[0]
        assert path.exists(), f"README.md links to {target}, but {path.relative_to(ROOT)} is not in the repository"


def test_the_addresses_agree_everywhere() -> None:
    assert SITE.endswith("/") and not REPO.endswith("/")
    config = (ROOT / "mkdocs.yml").read_text()
    settings = {k: v for k, v in re.findall(r"^(site_url|repo_url):\s*(\S+)\s*$", config, re.M)}
    assert settings == {"site_url": SITE, "repo_url": REPO}
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["url"] == SITE and citation["repository-code"] == REPO
    assert URLS["Homepage"] == REPO and URLS["Issues"] == REPO + "/issues"
    assert URLS["Changelog"].startswith(SITE) and site_page(URLS["Changelog"])[0].is_file()


def test_the_readme_shows_the_package_index_install_beside_the_source_one() -> None:
    assert "pip install flatminima" in README
    assert 'pip install "flatminima[huggingface,lightning]"' in README
    assert "python3 -m pip install -c constraints.txt -e ." in README.split("\n## ")[0]


def test_help_texts_send_readers_to_pages_that_exist() -> None:
    from flatminima.links import DOCS_URL, docs_page

    assert DOCS_URL == SITE
    named = set(
        re.findall(
            r"docs_page\(\s*[\"']([\w-]+)[\"']",
            "".join(path.read_text() for path in (ROOT / "src" / "flatminima").rglob("*.py")),
        )
    )
    assert named, "the help texts name pages with docs_page"
    for name in named:
        assert site_page(docs_page(name))[0].is_file(), f"docs_page({name!r}) names no page of docs/"
