"""mkdocs hook: render the docstrings' Sphinx cross-reference roles (``:class:`~a.b.C```) as plain code (``C``).

mkdocstrings renders the docstrings as Markdown, so a role arrives in the page as ``:class:<code>~a.b.C</code>``;
this drops the role and, for a ``~`` target, keeps only the last component, as Sphinx shows it.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match) -> str:
    target = match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if match.group(1) else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_plain, html)
