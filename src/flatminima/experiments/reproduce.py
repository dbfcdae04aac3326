"""``flatminima reproduce NAME``: one command per claim of the papers, with one output convention.

Each reproduction is a module of ``flatminima.experiments`` that defines ``REPRODUCTION``, a
``Reproduction`` whose ``run`` takes a ``Context`` and returns an ``Outcome``. The runner, not the
module, owns the convention: the table is printed on stdout, and the output folder receives ``results.json`` (the
named measured and predicted numbers, with the command and settings that made them), ``report.md`` (the title,
the command, the table, the module's commentary and its figures) and the figures themselves. ``--quick`` runs a
small version of the same experiment (the one the tests run); the full one takes minutes on a 2-core CPU.

The training reproductions also take the paper's own scale: flags such as ``--dataset cifar10 --data-root DATA
--model resnet32 --epochs 200 --device cuda`` reach the reproduction as ``Context.overrides``, fields of
``TrainConfig`` that replace its digits defaults. Each reproduction declares which fields it
honours (``Reproduction.overridable``) and the exact command of the paper's setting
(``Reproduction.paper_command``); a flag it does not honour is refused, never ignored.
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatminima.experiments.protocol import Claim
from flatminima.output_folder import OutputFolder, write_atomically

__all__ = [
    "TRAINING_FIELDS",
    "Context",
    "Outcome",
    "Reproduction",
    "available",
    "markdown_table",
    "run_reproduction",
]


#: The ``TrainConfig`` fields ``flatminima reproduce`` accepts as flags (the paper-scale
#: settings); each reproduction honours a subset, ``Reproduction.overridable``.
TRAINING_FIELDS: tuple[str, ...] = (
    "dataset",
    "data_root",
    "model",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "augment",
    "cutout",
    "rho",
    "device",
    "threads",
)


@dataclass(frozen=True)
class Context:
    """What a reproduction is asked for: the folder to write its figures into, quick or full, the seeds, and the
    training settings given on the command line (``overrides``: TrainConfig field -> value; empty by default)."""

    output: Path
    quick: bool
    seeds: tuple[int, ...]
    progress: Callable[[str], None] = print
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def figure_path(self, name: str) -> Path:
        """Where to save a figure called ``name`` (e.g. ``"trajectory.png"``)."""
        return self.output / name


@dataclass
class Outcome:
    """What a reproduction measured: a table (headers and rows), named results, commentary and figures.

    ``results`` must hold JSON-serialisable values; measured and predicted quantities side by side under names
    that say which is which (``measured_rate``, ``predicted_rate``). ``report`` is markdown that follows the table
    (what was measured, how, and where it differs from the paper); ``figures`` are files in the output folder.
    """

    headers: list[str]
    rows: list[list[Any]]
    results: dict[str, Any]
    report: str = ""
    figures: list[Path] = field(default_factory=list)
    caption: str = ""
    #: the paper's claims this reproduction tests, each with its computed verdict (``.protocol``)
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True)
class Reproduction:
    """One reproducible claim: its command name, a one-line summary, the paper, and the function that runs it."""

    name: str
    summary: str
    paper: str
    run: Callable[[Context], Outcome]
    default_seeds: tuple[int, ...] = (0, 1, 2)
    quick_seeds: tuple[int, ...] = (0,)
    #: the ``TRAINING_FIELDS`` this reproduction honours (empty: it trains nothing configurable)
    overridable: frozenset[str] = frozenset()
    #: the exact command that runs the paper's own setting (on a GPU), or "" when there is none
    paper_command: str = ""


def available() -> dict[str, Reproduction]:
    """Every reproduction, by name: the ``REPRODUCTION`` of each module of ``flatminima.experiments``."""
    import flatminima.experiments as package

    found: dict[str, Reproduction] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        reproduction = getattr(module, "REPRODUCTION", None)
        if isinstance(reproduction, Reproduction):
            if reproduction.name in found:
                raise RuntimeError(f"two reproductions are called {reproduction.name!r}")
            found[reproduction.name] = reproduction
    return dict(sorted(found.items()))


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table, first column left-aligned and the others right-aligned; floats to 4 significant digits."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(_format_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def claims_section(claims: Sequence[Claim]) -> str:
    """The report's verdicts: one line per claim, the verdict first, then what it rests on and the rule."""
    if not claims:
        return ""
    lines = ["## Verdicts", ""]
    lines += [f"- **{c.verdict.value}**: {c.statement}. Measured: {c.measured}. Rule: {c.rule}." for c in claims]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become strings; tuples become lists; tensors and numpy scalars
    become Python numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _check_overrides(reproduction: Reproduction, overrides: Mapping[str, Any]) -> None:
    """Refuse training settings the reproduction does not honour (never ignore a flag the user gave)."""
    unknown = sorted(set(overrides) - set(TRAINING_FIELDS))
    if unknown:
        raise ValueError(f"not a training setting of flatminima reproduce: {unknown}; choose from {TRAINING_FIELDS}")
    refused = sorted(set(overrides) - reproduction.overridable)
    if refused:
        flags = ", ".join("--" + f.replace("_", "-") for f in refused)
        accepted = ", ".join("--" + f.replace("_", "-") for f in sorted(reproduction.overridable))
        raise ValueError(
            f"reproduction {reproduction.name!r} does not take {flags}"
            + (f"; it takes {accepted}" if accepted else "; it trains no network, so it takes no training settings")
        )


def run_reproduction(
    name: str,
    output: str | Path | None = None,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Outcome:
    """Run the reproduction ``name``; print its table and write ``results.json``, ``report.md`` and figures.

    ``output`` defaults to ``runs/reproduce/NAME`` (``NAME-quick`` for a quick run, ``NAME-DATASET`` when the
    dataset is overridden). The folder is checked before any work and held for the run's lifetime
    (``flatminima.output_folder``): files of an earlier reproduction there are replaced, anyone else's are
    refused unless ``overwrite``. ``overrides`` are training settings (TrainConfig fields) the reproduction must
    honour; one it does not honour is an error.
    """
    reproductions = available()
    if name not in reproductions:
        raise ValueError(
            f"unknown reproduction {name!r}; choose from {', '.join(reproductions)} (flatminima reproduce --list)"
        )
    reproduction = reproductions[name]
    overrides = dict(overrides or {})
    _check_overrides(reproduction, overrides)
    chosen = tuple(seeds) if seeds else (reproduction.quick_seeds if quick else reproduction.default_seeds)
    default_folder = name + (f"-{overrides['dataset']}" if "dataset" in overrides else "") + ("-quick" if quick else "")
    folder = Path(output) if output is not None else Path("runs/reproduce") / default_folder
    with OutputFolder(folder, "reproduce", overwrite=overwrite):
        return _run_in(reproduction, folder, quick, chosen, command, progress, overrides)


def _run_in(
    reproduction: Reproduction,
    folder: Path,
    quick: bool,
    chosen: tuple[int, ...],
    command: str | None,
    progress: Callable[[str], None] | None,
    overrides: dict[str, Any],
) -> Outcome:
    """Run ``reproduction`` into the held ``folder``; print the table, write results.json, report.md."""
    name = reproduction.name
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    outcome = reproduction.run(Context(output=folder, quick=quick, seeds=chosen, progress=say, overrides=overrides))
    seconds = time.perf_counter() - started
    command = command or f"flatminima reproduce {name}" + (" --quick" if quick else "")
    table = markdown_table(outcome.headers, outcome.rows)
    print(table, flush=True)
    own = {"reproduction", "paper", "command", "quick", "seeds", "seconds", "overrides", "paper_command", "claims"}
    clashing = sorted(own & set(outcome.results))
    if clashing:
        raise RuntimeError(f"reproduction {name!r} returned results named {clashing}, which the runner writes itself")
    results = {
        "reproduction": name,
        "paper": reproduction.paper,
        "command": command,
        "quick": quick,
        "seeds": list(chosen),
        "seconds": round(seconds, 2),
        "overrides": overrides,
        "paper_command": reproduction.paper_command,
        "claims": [claim.as_dict() for claim in outcome.claims],
        **outcome.results,
    }
    write_atomically(folder / "results.json", json.dumps(_jsonable(results), indent=2, sort_keys=False) + "\n")
    figures = "\n\n".join(f"![{path.stem}]({path.name})" for path in outcome.figures)
    report = "\n\n".join(
        part
        for part in (
            f"# {reproduction.summary}",
            f"{reproduction.paper}. `{command}` ({'quick' if quick else 'full'} run, seeds {list(chosen)}, "
            f"{seconds:.0f} s).",
            outcome.caption,
            table,
            claims_section(outcome.claims),
            outcome.report.strip(),
            f"The paper's own setting (on a GPU): `{reproduction.paper_command}`" if reproduction.paper_command else "",
            figures,
        )
        if part
    )
    write_atomically(folder / "report.md", report + "\n")
    say(f"results.json, report.md and {len(outcome.figures)} figure(s) in {folder}")
    return outcome
