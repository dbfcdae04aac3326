"""mkdocs hooks: the docstrings' Sphinx roles as plain code, the repository's changelog as a page, and the gallery.

mkdocstrings renders the docstrings as Markdown, so a role (``:class:`~a.b.C```) arrives in the page as
``:class:<code>~a.b.C</code>``; :func:`on_page_content` drops the role and, for a ``~`` target, keeps only the last
component, as Sphinx shows it. :func:`on_page_markdown` replaces the include marker of ``docs/changelog.md`` with
``CHANGELOG.md`` (one file, kept at the repository's root where packaging tools expect it).

The gallery: each ``examples/NAME.py`` becomes the page ``gallery/NAME.md`` (its docstring's first line the title,
the rest the prose, then the code and the output of its last run, ``docs/gallery/NAME.txt``, and its figure,
``docs/gallery/NAME.png``, both written by ``python examples/build_gallery.py``), and ``gallery/index.md`` lists
them; the nav's ``Gallery`` entry becomes a section with every example. The pages are made here, so the examples'
code exists once.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

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


_ROOT = Path(__file__).resolve().parent
_EXAMPLES = _ROOT / "examples"
_OUTPUTS = _ROOT / "docs" / "gallery"  # each example's stdout, figure, and runs.json (when, where, how long)
_NAV_TITLE = "Gallery"


def gallery_examples() -> list[Path]:
    """The examples, in name order (``build_gallery.py``, which runs them, is not one)."""
    return sorted(path for path in _EXAMPLES.glob("*.py") if path.name != "build_gallery.py")


def split_example(path: Path) -> tuple[str, str, str]:
    """(title, prose, code) of an example: its docstring's first line, the docstring's rest, the source after it."""
    source = path.read_text(encoding="utf-8")
    module = ast.parse(source)
    docstring = ast.get_docstring(module, clean=True)
    if not docstring:
        raise ValueError(f"{path.name}: an example starts with a docstring (its first line the page's title)")
    title, _, prose = docstring.partition("\n")
    code = "\n".join(source.splitlines()[module.body[0].end_lineno :]).strip("\n")
    return title.strip(), prose.strip(), code


def _runs() -> dict[str, Any]:
    path = _OUTPUTS / "runs.json"
    return json.loads(path.read_text()) if path.exists() else {}


def gallery_page(path: Path) -> str:
    """The Markdown page of one example."""
    title, prose, code = split_example(path)
    name = path.stem
    run = _runs().get(name)
    lines = [f"# {title}", "", prose, "", f"Run it from a clone of the repository: `python examples/{name}.py`.", ""]
    lines += ["```python", code, "```", "", "## Output", ""]
    output = _OUTPUTS / f"{name}.txt"
    if run is None or not output.exists():
        raise FileNotFoundError(
            f"no recorded output of examples/{name}.py: run python examples/build_gallery.py {name}"
        )
    lines += [f"Its output on {run['machine']}, torch {run['torch']} ({run['seconds']:.0f} s):", ""]
    lines += ["```text", output.read_text(encoding="utf-8").rstrip("\n"), "```"]
    if (_OUTPUTS / f"{name}.png").exists():
        lines += ["", f"![{title}]({name}.png)"]
    return "\n".join(lines) + "\n"


def gallery_index() -> str:
    """The gallery's front page: one row per example, its title and the first sentence of its prose."""
    lines = [
        "# Gallery",
        "",
        "Short programs that each show one task end to end, with the output and figure of their last run. Each runs "
        "from a clone of the repository with `python examples/NAME.py` (no arguments; most take seconds), and the "
        "tests run every one of them. `python examples/build_gallery.py` reruns them and records what they print.",
        "",
        "| example | what it shows |",
        "|---|---|",
    ]
    for path in gallery_examples():
        title, prose, _ = split_example(path)
        first = re.split(r"(?<=[.!?])\s", " ".join(prose.split()), maxsplit=1)[0]
        lines.append(f"| [{title}]({path.stem}.md) | {first} |")
    return "\n".join(lines) + "\n"


def on_config(config: Any, **kwargs) -> Any:
    """The nav's ``Gallery`` entry becomes a section: the index, then every example by its title."""
    for index, item in enumerate(config["nav"] or []):
        if isinstance(item, dict) and item.get(_NAV_TITLE) == "gallery/index.md":
            pages = [{split_example(path)[0]: f"gallery/{path.stem}.md"} for path in gallery_examples()]
            config["nav"][index] = {_NAV_TITLE: ["gallery/index.md", *pages]}
    return config


def on_files(files: Any, config: Any, **kwargs) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, "gallery/index.md", content=gallery_index()))
    for path in gallery_examples():
        files.append(File.generated(config, f"gallery/{path.stem}.md", content=gallery_page(path)))
    return files
