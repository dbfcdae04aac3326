"""Helpers shared by the peer comparisons (``peer_*.py``): the float64 MLP, the pass counter, the state-dict round
trip, the options and the report.

Each script runs both sides from the same model and batches and reports how far apart the weights end; it imports
this module as ``from _peer import ...`` (see ``_common.py``).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import torch
from _common import Report, package_version
from torch import Tensor, nn


class Net(nn.Module):
    """10 -> 16 -> 3 with tanh, float64, the same initialisation every time; ``dead`` adds a parameter whose gradient
    is always exactly zero."""

    def __init__(self, dead: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
        self.dead = nn.Parameter(torch.randn(4)) if dead else None
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out if self.dead is None else out + 0.0 * self.dead.sum()


class Counter:
    """Counts the forward passes of the models it watches."""

    def __init__(self, model: nn.Module) -> None:
        self.passes = 0
        self.watch(model)

    def watch(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(lambda module, args: self._count())

    def _count(self) -> None:
        self.passes += 1


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` saved and loaded back with ``torch.load(weights_only=True)``, as a resumed run would get it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------------------------------------- options and report


def options_parser(doc: str) -> argparse.ArgumentParser:
    """The options every peer script takes, ``--steps`` (default 20) and ``--output``, described by ``doc``'s first
    line; a script adds its own before parsing."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", type=Path, default=None)
    return parser


def parse_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``argv`` parsed, with torch on one thread (the reports compare runs to rounding and say so)."""
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return args


class PeerReport(Report):
    """A report opened with its title, pytorch_optimizer's version, the command, interpreter and run length; it
    collects the comparison rows for ``comparison_table``."""

    def __init__(self, title: str, steps: int) -> None:
        super().__init__()
        self.rows: list[tuple[str, str, str]] = []
        self(f"# {title} against pytorch_optimizer {package_version('pytorch_optimizer')}")
        self()
        command = " ".join(["python", *sys.argv])
        run = f"torch {torch.__version__}, float64, {steps} steps, 1 thread"
        self(f"`{command}` (interpreter `{sys.executable}`); {run}.")
        self()

    def row(self, what: str, value: float | str, note: str) -> None:
        """A comparison; a number is shown to two significant digits."""
        self.rows.append((what, value if isinstance(value, str) else f"{value:.1e}", note))

    def comparison_table(self) -> None:
        """The rows so far, as a table, and a blank line."""
        self("| comparison | max abs weight difference | note |")
        self("|---|---:|---|")
        for what, value, note in self.rows:
            self(f"| {what} | {value} | {note} |")
        self()

    def write(self, output: Path | None) -> None:
        """The report to ``output``, if given."""
        if output is not None:
            output.write_text("\n".join(self.lines) + "\n")
