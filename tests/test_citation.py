"""The citation file: valid CFF fields, the package's version, and the docs' citing page in step with it."""

from __future__ import annotations

from pathlib import Path

import yaml

from flatminima import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_citation_file_names_the_software_and_its_version() -> None:
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert {"message", "title", "authors"} <= set(citation)
    assert str(citation["version"]) == __version__
    assert f"version = {{{__version__}}}" in (ROOT / "docs" / "citing.md").read_text()
