"""Release packaging: the sdist and the wheel build from the repository, and the wheel works on its own.

The wheel is installed with pip into a fresh virtual environment (nothing borrowed from this one), with the
constraints file, so its declared dependencies are what makes it run: a missing one fails here. Its console
script then runs ``--version`` and ``demo --quick`` from a folder outside the repository. The install takes
about a minute (torch's CPU wheel from the machine's wheel folder, the rest from the package index).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_readme_links import URLS, targets  # tests/ is on sys.path: pytest's rootdir-less "prepend" import mode

from flatminima import __version__

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "flatminima"

if importlib.util.find_spec("build") is None:  # a clear failure, not a skip: the README's test command installs it
    raise ImportError("the packaging tests need the build package: pip install -c constraints.txt -e '.[dev]'")


def _package_files() -> set[str]:
    """Every file of the package in the source tree, relative to src/ (no caches)."""
    return {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")
    }


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from it (python -m build).

    Without build isolation (nothing downloaded) when this environment's setuptools can build the wheel by itself
    (>= 70.1, which has bdist_wheel built in); otherwise build fetches pyproject's build requirements.
    """
    out = tmp_path_factory.mktemp("dist")
    try:
        version = tuple(int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        version = (0, 0)
    isolation = ["--no-isolation"] if version >= (70, 1) else []
    built = _run([sys.executable, "-m", "build", *isolation, "--outdir", str(out), str(ROOT)], cwd=out, timeout=300)
    (out / "build.log").write_text(built.stdout + built.stderr)
    return out


def test_the_build_warns_of_nothing(dist: Path) -> None:
    """No deprecation on the way (the license table form that setuptools stops accepting in 2027, for one)."""
    log = (dist / "build.log").read_text()
    assert "Deprecat" not in log, log  # (MANIFEST.in's "no previously-included files" notes are not warnings of it)


def test_sdist_holds_what_a_build_needs(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    assert sdist.name == f"flatminima-{__version__}.tar.gz"
    top = f"flatminima-{__version__}/"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(top) for name in archive.getnames()}
    for needed in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "PKG-INFO"):
        assert needed in names
    missing = {f"src/{name}" for name in _package_files()} - names
    assert not missing, f"package files missing from the sdist: {sorted(missing)}"
    assert not any(name.startswith("tests/") for name in names)  # MANIFEST.in: they need docs/ and examples/


def test_wheel_holds_the_package_its_data_and_the_entry_point(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"flatminima-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"flatminima-{__version__}.dist-info/"
        metadata = archive.read(info + "METADATA").decode()
        entry_points = archive.read(info + "entry_points.txt").decode()
    missing = _package_files() - names  # every .py and every data file under src/flatminima
    assert not missing, f"package files missing from the wheel (package-data?): {sorted(missing)}"
    assert f"\nVersion: {__version__}\n" in metadata  # pyproject's dynamic version is __version__
    assert "\nLicense-Expression: MIT\n" in metadata  # SPDX (PEP 639), not the deprecated table form
    assert "flatminima/py.typed" in names  # Typing :: Typed, and type checkers read the package's hints
    assert "flatminima = flatminima.cli:main" in entry_points
    for extra in ("dev", "docs", "huggingface", "lightning"):
        assert f"Provides-Extra: {extra}\n" in metadata
    for label, url in URLS.items():
        assert f"\nProject-URL: {label}, {url}\n" in metadata
    description = metadata.split("\n\n", 1)[1]  # the long description: the README, as a package index shows it
    assert "Description-Content-Type: text/markdown" in metadata and description.startswith("# flatminima")
    relative = [target for target in targets(description) if not target.startswith("https://")]
    assert not relative, f"relative links in the long description break on a package index: {relative}"


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*install, "-c", str(ROOT / "constraints.txt"), str(wheel)], cwd=tmp_path, timeout=900)
    _run([str(python), "-m", "pip", "check"], cwd=tmp_path)  # every declared requirement satisfied
    torch_version = _run([str(python), "-c", "import torch; print(torch.__version__)"], cwd=tmp_path).stdout
    pinned = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    assert torch_version.startswith(pinned.removeprefix("torch==")), f"constraints not applied: torch {torch_version}"

    where = _run(
        [
            str(python),
            "-c",
            "import flatminima, importlib.metadata as m; print(flatminima.__file__, m.version('flatminima'))",
        ],
        cwd=tmp_path,
    ).stdout.split()
    assert Path(where[0]).resolve().is_relative_to(venv.resolve()), f"flatminima imported from {where[0]}"
    assert where[1] == __version__

    script = str(venv / "bin" / "flatminima")
    assert _run([script, "--version"], cwd=tmp_path).stdout.strip() == f"flatminima {__version__}"
    demo = tmp_path / "demo"
    out = _run([script, "demo", "--quick", "--no-progress", "--output", str(demo)], cwd=tmp_path).stdout
    assert "clean test acc %" in out and "SAM - SGD" in out
    assert (demo / "test_accuracy.png").stat().st_size > 1000 and "| SAM |" in (demo / "results.md").read_text()
