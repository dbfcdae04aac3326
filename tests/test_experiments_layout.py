"""Every reproduction has one shape: a package whose compute function returns a typed result and whose report
turns it into the outcome; no module of experiments/ grows past 400 lines."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import typing
from pathlib import Path

import pytest

import flatminima.experiments as experiments
from flatminima.experiments.reproduce import available

ROOT = Path(experiments.__file__).parent
PACKAGES = sorted(
    f"{experiments.__name__}.{info.name}"
    for info in pkgutil.iter_modules(experiments.__path__)
    if hasattr(importlib.import_module(f"{experiments.__name__}.{info.name}"), "REPRODUCTION")
)


def test_no_experiment_module_is_over_400_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n for path in ROOT.rglob("*.py") if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}


def test_every_reproduction_is_a_package_with_compute_and_report() -> None:
    assert len(PACKAGES) == len(available()) >= 7
    for package in PACKAGES:
        folder = ROOT / package.rsplit(".", 1)[-1]
        assert (folder / "__init__.py").is_file(), package
        assert (folder / "compute.py").is_file() and (folder / "report.py").is_file(), package


@pytest.mark.parametrize("package", PACKAGES)
def test_compute_returns_a_dataclass(package: str) -> None:
    compute = importlib.import_module(f"{package}.compute").compute
    result = typing.get_type_hints(compute)["return"]
    assert inspect.isclass(result) and dataclasses.is_dataclass(result), (package, result)
