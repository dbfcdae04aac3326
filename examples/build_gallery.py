"""Run the examples and record what the gallery shows: docs/gallery/NAME.txt, NAME.png and runs.json.

    python examples/build_gallery.py            # every example
    python examples/build_gallery.py NAME ...   # some of them

Each example runs as a reader would run it (``python examples/NAME.py``, plus ``--output-dir`` when it draws a
figure), from the repository's root. What it prints becomes NAME.txt (without its last ``figure:`` line), its
figure NAME.png, and runs.json notes the machine, the torch version and the wall time. The documentation site's
gallery pages (mkdocs_hooks.py) show these beside each example's code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
OUTPUTS = ROOT / "docs" / "gallery"
FIGURE_LINE = "figure: "


def examples() -> list[str]:
    """Every example's name (this script is not one)."""
    return sorted(p.stem for p in EXAMPLES.glob("*.py") if p.name != Path(__file__).name)


def draws_a_figure(name: str) -> bool:
    """An example that draws a figure takes ``--output-dir`` (the gallery's convention)."""
    return "--output-dir" in (EXAMPLES / f"{name}.py").read_text(encoding="utf-8")


def machine() -> str:
    """The CPU's model and core count (or the GPU's name when the example could see one)."""
    model = "an unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    text = f"{os.cpu_count()} cores of {model}"
    return text + (f" and {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")


def run(name: str, extra: list[str] | None = None, timeout: float = 1800) -> tuple[str, Path | None, float]:
    """Run one example as a reader would: its stdout (the ``figure:`` line removed), its figure, its wall time."""
    folder = Path(tempfile.mkdtemp(prefix=f"gallery-{name}-"))
    args = [sys.executable, str(EXAMPLES / f"{name}.py"), *(extra or [])]
    if draws_a_figure(name):
        args += ["--output-dir", str(folder)]
    start = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"examples/{name}.py failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    lines = [line for line in result.stdout.splitlines() if not line.startswith(FIGURE_LINE)]
    figure = folder / f"{name}.png"
    return "\n".join(lines).rstrip() + "\n", (figure if figure.exists() else None), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("names", nargs="*", help="examples to run (default: all)")
    names = parser.parse_args(argv).names or examples()
    unknown = sorted(set(names) - set(examples()))
    if unknown:
        parser.error(f"no such example: {', '.join(unknown)} (there are: {', '.join(examples())})")
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    runs_file = OUTPUTS / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    for name in names:
        print(f"{name} ...", flush=True)
        output, figure, seconds = run(name)
        (OUTPUTS / f"{name}.txt").write_text(output, encoding="utf-8")
        stale = OUTPUTS / f"{name}.png"
        if figure is not None:
            shutil.copyfile(figure, stale)
        elif stale.exists():
            stale.unlink()
        runs[name] = {"machine": machine(), "torch": torch.__version__.split("+")[0], "seconds": round(seconds, 1)}
        print(f"{name}: {seconds:.1f} s", flush=True)
    runs = {name: runs[name] for name in sorted(runs) if name in examples()}
    runs_file.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
