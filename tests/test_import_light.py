"""``import flatminima`` and ``flatminima --help`` load nothing heavy that they do not use (issue 30).

Each check runs in a fresh interpreter, so what earlier tests imported does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Loaded only when used: sharded parameters (DTensor, and sympy through it), the framework integrations, plotting,
# scipy, and the compiler stack.
HEAVY = (
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "sympy",
    "flatminima.integrations",
    "transformers",
    "lightning",
    "pytorch_lightning",
    "matplotlib",
    "scipy",
    "torch._dynamo",
    "torch._inductor",
)

IMPORT = "import flatminima, sys, json; print(json.dumps(sorted(sys.modules)))"
HELP = (
    "import contextlib, io, json, sys\n"
    "from flatminima.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    try:\n"
    "        main(['--help'])\n"
    "    except SystemExit:\n"
    "        pass\n"
    "print(json.dumps(sorted(sys.modules)))\n"
)


def _modules(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


@pytest.mark.parametrize("code", [IMPORT, HELP], ids=["import", "help"])
def test_import_loads_nothing_heavy(code: str) -> None:
    modules = _modules(code)
    assert "flatminima" in modules
    assert _heavy(modules) == [], "import these lazily, where they are used"


def test_import_loads_only_the_training_api() -> None:
    """``import flatminima`` is the optimisers and their rules: not the measurement, training or data packages."""
    modules = set(_modules(IMPORT))
    for package in ("flatminima.sharpness", "flatminima.train", "flatminima.experiments", "flatminima.data"):
        assert package not in modules, f"{package} is imported by import flatminima"
    assert "flatminima.optim.sam" in modules
