"""The documentation cannot drift from the code: its Python examples run here, and the site builds strictly.

Each page's ```python blocks run in order in one namespace. A block preceded by the line ``<!-- no-test -->``
is skipped (used only for blocks that need a GPU, a dataset or torchrun). A page whose examples use a model or
data they do not define gets a hidden setup from ``SETUP`` below, run before its first block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NO_TEST = "<!-- no-test -->"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# Hidden setup for pages whose examples take a model and data as given.
SETUP = {
    "variants.md": """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
per_example_loss = torch.nn.CrossEntropyLoss(reduction="none")
loss_fn = torch.nn.CrossEntropyLoss()
x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
batches = [(torch.randn(32, 10), torch.randint(0, 3, (32,))) for _ in range(3)]
total_steps = 3
def closure():
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss
""",
    "sharpness.md": """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
mean_loss_fn = torch.nn.CrossEntropyLoss()
per_example_loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
data = (torch.randn(64, 6), torch.randint(0, 3, (64,)))
""",
    "integrations-huggingface.md": """
import torch
import transformers
from torch import nn


class TinyClassifier(nn.Module):  # what a Hugging Face model returns: an output with .loss
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 2)

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)


torch.manual_seed(0)
model = TinyClassifier()
train = [{"x": torch.randn(8), "labels": torch.tensor(i % 2)} for i in range(64)]
loader = torch.utils.data.DataLoader(train, batch_size=16)
""",
}

# The pages whose Python examples run here. Lightning is left out: its example is a whole training script on your
# model and data with a GPU precision; tests/test_integration_lightning.py tests the same calls on tiny models.
PAGES = ["index.md", "guide-training.md", "variants.md", "sharpness.md", "integrations-huggingface.md"]


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


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files (figures) write them here
    blocks = python_blocks((DOCS / page).read_text(encoding="utf-8"))
    assert blocks, f"{page} has no runnable python block"
    namespace: dict = {"__name__": f"docs_{page.replace('.', '_').replace('-', '_')}"}
    if page in SETUP:
        exec(compile(SETUP[page], f"<setup for {page}>", "exec"), namespace)
    for line, code in blocks:
        try:
            exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"the python block at docs/{page} line {line} failed: {err!r}") from err


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


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README.md links to a missing file: {target}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
