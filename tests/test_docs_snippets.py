"""The documentation cannot drift from the code: its Python examples run here, and the site builds strictly.

Each page's ```python blocks run in order in one namespace. A block preceded by the line ``<!-- no-test -->``
is skipped (used only for blocks that need a GPU, a dataset or torchrun). A page whose examples use a model or
data they do not define gets a hidden setup from ``SETUP`` below: run before its first block, or, given as
``{key: code}``, before the blocks each key names (a block index, or a text: the first block containing it;
``AFTER_LAST`` runs after the last one). Pages in ``ISOLATED`` (a process group, a registered optimiser name)
run in a fresh interpreter.
"""

from __future__ import annotations

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

AFTER_LAST = -1
_TINY_CLASSIFIER = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
loss_fn = torch.nn.CrossEntropyLoss()
x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
train_set = torch.utils.data.TensorDataset(torch.randn(64, 8), y.repeat(2))
train_loader = torch.utils.data.DataLoader(train_set, batch_size=16)
def closure():
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss
"""
# The DDP and FSDP2 examples on one gloo process: they need a process group, not a second process.
_PROCESS_GROUP = """
import tempfile
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(dir="."), rank=0, world_size=1)
"""
_FSDP_SETUP = (
    _PROCESS_GROUP
    + """
import torch
class LayeredNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)])
    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))
torch.manual_seed(0)
model = LayeredNet()
x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
def closure():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss
"""
)
_FSDP_CHECK = """
from torch.distributed.tensor import DTensor
assert all(isinstance(param, DTensor) for param in model.parameters())
assert opt.state_dict()["sam_steps"] == 1
dist.destroy_process_group()
"""

# Hidden setup for pages whose examples take a model and data as given.
# the worked example's options reached the run: its config.yaml, and a bad value's one-line error
_VARIANT_OPTIONS_CHECK = """
import yaml
from flatminima.cli import main as _main
_saved = yaml.safe_load(open("runs/random-direction/config.yaml"))
assert _saved["random_every"] == 2 and _saved["random_seed_offset"] == 0, _saved
assert _main(["train", "--optimizer", "random-direction", "--random-every", "0", "--output", "runs/bad"]) == 2
"""

SETUP: dict[str, str | dict[int | str, str]] = {
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
    "integrations-lightning.md": _TINY_CLASSIFIER,
    "architecture.md": {1: "import flatminima\n" + _TINY_CLASSIFIER, AFTER_LAST: _VARIANT_OPTIONS_CHECK},
    "compile-fsdp.md": {1: _FSDP_SETUP, AFTER_LAST: _FSDP_CHECK},
    "guide-training.md": {
        "DistributedDataParallel(model)": _PROCESS_GROUP,
        AFTER_LAST: "assert dist.is_initialized()\ndist.destroy_process_group()",
    },
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


def run_page(page: str) -> None:
    """Run the page's python blocks in order in one namespace, with its hidden setup; name a failing block."""
    blocks = python_blocks((DOCS / page).read_text(encoding="utf-8"))
    assert blocks, f"{page} has no runnable python block"
    setup = SETUP.get(page, {})
    setup = {0: setup} if isinstance(setup, str) else setup
    module = types.ModuleType(f"docs_{page.replace('.', '_').replace('-', '_')}")  # a module, as a user's file is
    sys.modules[module.__name__] = module  # (dataclasses look their module up there)
    namespace: dict = module.__dict__
    steps, pending = [], dict(setup)
    for index, (line, code) in enumerate(blocks):
        for key in [k for k in pending if k == index or (isinstance(k, str) and k in code)]:
            steps.append((f"<setup before block {index} of {page}>", pending.pop(key)))
        steps.append((f"docs/{page}:{line}", code))
    pending.pop(AFTER_LAST, None)
    assert not pending, f"hidden setup for {page} names no block: {sorted(map(str, pending))}"
    if AFTER_LAST in setup:
        steps.append((f"<check after the last block of {page}>", setup[AFTER_LAST]))
    for where, code in steps:
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"{where} failed: {err!r}") from err


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


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README.md links to a missing file: {target}"


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


if __name__ == "__main__":  # an ISOLATED page, in its own interpreter: python tests/test_docs_snippets.py PAGE
    import torch
    from conftest import TEST_THREADS  # tests/ is this script's folder, so on sys.path

    # conftest's per-test thread count does not reach this interpreter: set it here, not the machine's core count
    torch.set_num_threads(TEST_THREADS)
    run_page(sys.argv[1])
