"""Where the documentation lives, for help texts and messages that send a reader to a page of it.

The same address is pyproject's ``Documentation`` URL and mkdocs.yml's ``site_url`` (a test checks that they agree).
"""

from __future__ import annotations

__all__ = ["DOCS_URL", "docs_page"]

DOCS_URL = "https://flatminima.readthedocs.io/en/latest/"


def docs_page(name: str, anchor: str = "") -> str:
    """The address of a page of the documentation: ``docs_page("variants", "wsam")`` for docs/variants.md#wsam."""
    return f"{DOCS_URL}{name}/" + (f"#{anchor}" if anchor else "")
