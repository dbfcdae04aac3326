"""The documentation cannot drift from the code: its Python examples run here, and the site builds strictly.

Each page's ```python blocks run in order in one namespace, exactly as the reader sees them: a page whose
examples need a model or data sets them up in a visible block of its own (nothing is added here before or between
its blocks), so a reader who copies the blocks into one file gets what the test runs. A block preceded by the line
``<!-- no-test -->`` is skipped (used only for blocks that need a GPU, a dataset or torchrun). ``CHECKS`` holds
assertions about a page's outcome, run after its last block; they define nothing the blocks use. Pages in
``ISOLATED`` (a process group, a registered optimiser name) run in a fresh interpreter.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NO_TEST = "<!-- no-test -->"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# Checks run after a page's last block: what its examples should have done. Not setup: the page's own blocks
# define every name these use.
_FSDP_CHECK = """
from torch.distributed.tensor import DTensor
assert all(isinstance(param, DTensor) for param in model.parameters())
assert opt.state_dict()["sam_steps"] == 1
dist.destroy_process_group()
"""
# the worked example's options reached the run: its config.yaml, and a bad value's one-line error
_VARIANT_OPTIONS_CHECK = """
import yaml
from flatminima.cli import main as _main
_saved = yaml.safe_load(open("runs/random-direction/config.yaml"))
assert _saved["random_every"] == 2 and _saved["random_seed_offset"] == 0, _saved
assert _main(["train", "--optimizer", "random-direction", "--random-every", "0", "--output", "runs/bad"]) == 2
"""

CHECKS: dict[str, str] = {
    "architecture.md": _VARIANT_OPTIONS_CHECK,
    "compile-fsdp.md": _FSDP_CHECK,
    "guide-training.md": "assert dist.is_initialized()\ndist.destroy_process_group()",
}


# Every page with Python examples runs here (test_every_page_with_python_is_run checks that none is left out).
PAGES = [
    "index.md",
    "guide-training.md",
    "variants.md",
    "sharpness.md",
    "integrations-huggingface.md",
    "integrations-lightning.md",
    "compile-fsdp.md",
    "architecture.md",
]
ISOLATED = {"compile-fsdp.md", "architecture.md", "guide-training.md"}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block not marked ``<!-- no-test -->`` on the line before it."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if before == NO_TEST:
            continue
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def test_block_extraction_honours_no_test():
    text = "a\n```python\nx = 1\n```\n\n<!-- no-test -->\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n")]


def run_blocks(name: str, blocks: list[tuple[int, str]], check: str | None = None) -> None:
    """Run ``blocks`` in order in one namespace, nothing before or between them, then ``check``; name a failure."""
    module = types.ModuleType(f"docs_{re.sub(r'[^0-9A-Za-z_]', '_', name)}")  # a module, as a user's file is
    sys.modules[module.__name__] = module  # (dataclasses look their module up there)
    namespace: dict = module.__dict__
    steps = [(f"docs/{name}:{line}", code) for line, code in blocks]
    if check is not None:
        steps.append((f"<check after the last block of {name}>", check))
    for where, code in steps:
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"{where} failed: {err!r}") from err


def run_page(page: str) -> None:
    """Run the page's python blocks as the reader sees them, in order, then the page's check."""
    blocks = python_blocks((DOCS / page).read_text(encoding="utf-8"))
    assert blocks, f"{page} has no runnable python block"
    run_blocks(page, blocks, CHECKS.get(page))


def test_a_block_that_needs_what_the_page_does_not_show_fails():
    # no setup is added: a name defined only outside the page's blocks is a failure, named by its block
    text = "```python\nimport torch\n```\n\nThen:\n\n```python\nopt = torch.optim.SGD(model.parameters())\n```\n"
    with pytest.raises(AssertionError, match=r"docs/page\.md:7 failed: NameError\(\"name 'model' is not defined"):
        run_blocks("page.md", python_blocks(text))
    setup = "The examples run after this setup:\n\n```python\nimport torch\nmodel = torch.nn.Linear(2, 1)\n```\n"
    run_blocks("page.md", python_blocks(setup + text))  # the same blocks, with the setup shown


def test_checks_name_pages_that_are_run():
    assert set(CHECKS) <= set(PAGES), sorted(set(CHECKS) - set(PAGES))


# the pages run in their own interpreter are slow (a fresh torch import, a process group, torch.compile)
@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in ISOLATED else p for p in PAGES])
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files (figures, runs) write them here
    if page not in ISOLATED:
        run_page(page)
        return
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), page], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_every_page_with_python_is_run():
    with_python = {path.name for path in DOCS.rglob("*.md") if python_blocks(path.read_text(encoding="utf-8"))}
    assert with_python <= set(PAGES), f"pages whose python examples no test runs: {sorted(with_python - set(PAGES))}"


README_COMMANDS = (
    "python3 -m pip install -c constraints.txt -e . && python3 -m flatminima demo",
    'python3 -m pip install -q -c constraints.txt -e ".[dev,docs,huggingface,lightning]" && python3 -m pytest -q',
)


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) < 8000, f"README.md is {len(text)} characters; move detail into docs/"
    lines = text.splitlines()
    for command in README_COMMANDS:  # CI's contract (.ci/run runs the second one verbatim)
        assert command in lines, f"README.md lost the command line: {command}"
    for line, code in python_blocks(text):
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})


# the packages whose __all__ is the public API (each name must have its entry in docs/api.md)
PUBLIC_PACKAGES = (
    "flatminima",
    "flatminima.optim",
    "flatminima.sharpness",
    "flatminima.variants",
    "flatminima.train",
    "flatminima.data",
    "flatminima.models",
    "flatminima.dynamics",
)


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # every public name has its entry in the API reference (an anchor of its own, under its module or where the
    # module re-exports it from); __version__ is named in the page's prose
    reference = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'id="(flatminima[\w.]*)"', reference))
    assert "flatminima.__version__" in (ROOT / "docs" / "api.md").read_text()
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        missing = [
            name
            for name in module.__all__
            if name != "__version__" and not any(i == f"{package}.{name}" or i.endswith(f".{name}") for i in ids)
        ]
        assert not missing, f"docs/api.md leaves out these public names of {package}: {missing}"


if __name__ == "__main__":  # an ISOLATED page, in its own interpreter: python tests/test_docs_snippets.py PAGE
    import torch
    from conftest import TEST_THREADS  # tests/ is this script's folder, so on sys.path

    # conftest's per-test thread count does not reach this interpreter: set it here, not the machine's core count
    torch.set_num_threads(TEST_THREADS)
    run_page(sys.argv[1])
