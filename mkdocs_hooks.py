"""mkdocs hooks: the docstrings' Sphinx roles as plain code, and the repository's changelog as a page.

mkdocstrings renders the docstrings as Markdown, so a role (``:class:`~a.b.C```) arrives in the page as
``:class:<code>~a.b.C</code>``; :func:`on_page_content` drops the role and, for a ``~`` target, keeps only the last
component, as Sphinx shows it. :func:`on_page_markdown` replaces the include marker of ``docs/changelog.md`` with
``CHANGELOG.md`` (one file, kept at the repository's root where packaging tools expect it).
"""

from __future__ import annotations

import re
from pathlib import Path

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match) -> str:
    target = match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if match.group(1) else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_plain, html)


_INCLUDE = "<!-- include: CHANGELOG.md"
_CHANGELOG = Path(__file__).resolve().parent / "CHANGELOG.md"


def on_page_markdown(markdown: str, **kwargs) -> str:
    if _INCLUDE not in markdown:
        return markdown
    body = _CHANGELOG.read_text().split("\n", 1)[1]  # its own "# Changelog" title is the page's
    return markdown[: markdown.index(_INCLUDE)] + body.lstrip("\n")
