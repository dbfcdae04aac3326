"""The gallery: every example under examples/ runs as a reader runs it, and the site shows its code with the output of
its last run. The pages are made by mkdocs_hooks.py from the examples and docs/gallery/ (what
``python examples/build_gallery.py`` recorded); the slow tests run each example and check that what it prints has
the recorded output's shape (its words and layout; the numbers masked, since float32 training differs across
machines in the last digits).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "docs" / "gallery"
WIDTH = 88  # the site's code column (tests/test_docs_width.py)
TEST_ARGS = re.compile(r"^# gallery-test-args:(.*)$", re.M)  # a shorter run for the tests (slow examples only)


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOKS = _load(ROOT / "mkdocs_hooks.py")
BUILD = _load(ROOT / "examples" / "build_gallery.py")
EXAMPLES = [path.stem for path in HOOKS.gallery_examples()]


def skeleton(text: str) -> list[str]:
    """The output's words and layout: every number masked, runs of spaces (table padding) as one."""
    masked = re.sub(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", text)
    return [" ".join(line.split()) for line in masked.strip().splitlines()]


def test_the_gallery_has_its_examples() -> None:
    assert len(EXAMPLES) >= 8, EXAMPLES
    assert BUILD.examples() == EXAMPLES  # the runner and the site see the same examples
    assert "build_gallery" not in EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_is_a_page_with_its_code_and_recorded_output(name: str) -> None:
    path = ROOT / "examples" / f"{name}.py"
    title, prose, code = HOOKS.split_example(path)
    assert title and not title.endswith(".") and prose, "a title line, then prose"
    assert not re.search(r":(class|func|meth|mod|attr):`", prose), "plain Markdown prose, no Sphinx roles"
    long = [n for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > WIDTH]
    assert not long, f"examples/{name}.py: lines {long} are wider than the site's {WIDTH} columns"
    page = HOOKS.gallery_page(path)
    assert page.startswith(f"# {title}\n") and f"```python\n{code}\n```" in page
    recorded = (OUTPUTS / f"{name}.txt").read_text()
    assert recorded.strip() and recorded.rstrip("\n") in page
    assert (OUTPUTS / f"{name}.png").exists() == BUILD.draws_a_figure(name), "a figure exactly when it draws one"
    assert f"![{title}]({name}.png)" in page or not BUILD.draws_a_figure(name)


def test_no_recorded_output_outlives_its_example() -> None:
    recorded = {p.stem for p in OUTPUTS.iterdir() if p.suffix in (".txt", ".png")}
    assert recorded <= set(EXAMPLES), f"outputs of removed examples: {sorted(recorded - set(EXAMPLES))}"
    runs = json.loads((OUTPUTS / "runs.json").read_text())
    assert sorted(runs) == EXAMPLES
    assert all(run["seconds"] > 0 and run["machine"] and run["torch"] for run in runs.values())


def test_the_index_links_every_example_and_the_nav_lists_them() -> None:
    index = HOOKS.gallery_index()
    for name in EXAMPLES:
        assert f"]({name}.md)" in index
    config = {"nav": [{"Getting started": "index.md"}, {"Gallery": "gallery/index.md"}]}
    section = HOOKS.on_config(config)["nav"][1]["Gallery"]
    assert section[0] == "gallery/index.md" and [next(iter(p.values())) for p in section[1:]] == [
        f"gallery/{name}.md" for name in EXAMPLES
    ]


def test_an_example_without_a_docstring_is_refused(tmp_path: Path) -> None:
    bare = tmp_path / "bare.py"
    bare.write_text("print('hello')\n")
    with pytest.raises(ValueError, match="starts with a docstring"):
        HOOKS.split_example(bare)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_runs_as_a_reader_runs_it(name: str) -> None:
    source = (ROOT / "examples" / f"{name}.py").read_text()
    shorter = TEST_ARGS.search(source)
    output, figure, _ = BUILD.run(name, shorter.group(1).split() if shorter else [], timeout=600)
    assert (figure is not None) == BUILD.draws_a_figure(name)
    if shorter is None:  # the same run as the recorded one: the same words, rows and columns
        assert skeleton(output) == skeleton((OUTPUTS / f"{name}.txt").read_text())
    else:
        assert output.strip()
