"""Every claim with its verdict, in one table: ``flatminima reproduce --all`` prints it after running every
reproduction, and ``flatminima reproduce --verdicts FOLDER`` prints it from the ``results.json`` files already in
a folder (the README's table is the latter, over the stored full runs in ``docs/reproductions``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flatminima.experiments.protocol import Verdict

__all__ = ["ClaimRow", "claims_of", "collect", "verdict_summary", "verdict_table"]


@dataclass(frozen=True)
class ClaimRow:
    """One claim of one reproduction's run, as its ``results.json`` holds it."""

    reproduction: str
    folder: Path
    quick: bool
    statement: str
    measured: str
    verdict: Verdict


def claims_of(results_file: Path) -> list[ClaimRow]:
    """The claims one reproduction's ``results.json`` holds; refused when it holds none (an older version's)."""
    results = json.loads(results_file.read_text())
    name = results.get("reproduction")
    if not isinstance(name, str) or "claims" not in results:
        raise ValueError(
            f"{results_file} is not the results.json of a flatminima reproduction with verdicts (no 'claims'); "
            "run the reproduction again with this version"
        )
    return [
        ClaimRow(
            name, results_file.parent, bool(results.get("quick")), c["statement"], c["measured"], Verdict(c["verdict"])
        )
        for c in results["claims"]
    ]


def collect(folder: str | Path) -> list[ClaimRow]:
    """The claims of every reproduction whose ``results.json`` lies in a subfolder of ``folder`` (one level down),
    in the order of the reproductions' names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give the folder that holds the reproductions' folders")
    found = sorted(folder.glob("*/results.json"))
    if not found:
        raise FileNotFoundError(f"no reproduction's results.json in the subfolders of {folder}")
    rows = [row for path in found for row in claims_of(path)]
    return sorted(rows, key=lambda row: row.reproduction)


def report_link(link_base: str, name: str) -> str:
    """Where a reproduction's report lies: ``link_base`` with ``{name}`` filled in when it holds that field (a
    site's page, ``https://.../reproductions/{name}/report/``), else ``{link_base}/{name}/report.md`` (a file)."""
    return link_base.format(name=name) if "{name}" in link_base else f"{link_base}/{name}/report.md"


def verdict_table(rows: Sequence[ClaimRow], link_base: str | None = None) -> str:
    """A markdown table: reproduction, claim, measured, verdict, one row per claim, and a line counting the
    verdicts. ``link_base`` links each reproduction's name to its report (``report_link``)."""
    lines = ["| reproduction | claim | measured | verdict |", "|---|---|---|---|"]
    for row in rows:
        name = row.reproduction + (" (quick)" if row.quick else "")
        if link_base is not None:
            name = f"[{name}]({report_link(link_base, row.folder.name)})"
        cells = (name, row.statement, row.measured, f"**{row.verdict.value}**")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    counts = {v: sum(row.verdict is v for row in rows) for v in Verdict}
    lines += ["", ", ".join(f"{v.value}: {n}" for v, n in counts.items()) + f" (of {len(rows)} claims)."]
    return "\n".join(lines)


def verdict_summary(rows: Sequence[ClaimRow], link_base: str | None = None) -> str:
    """The same claims counted per reproduction, one row each (the README's front-page form of
    ``verdict_table``): how many claims, and how many of each verdict."""
    names = list(dict.fromkeys(row.reproduction for row in rows))
    lines = ["| reproduction | claims | SUPPORTS | CONTRADICTS | INCONCLUSIVE |", "|---|---:|---:|---:|---:|"]
    for name in names:
        own = [row for row in rows if row.reproduction == name]
        label = name + (" (quick)" if own[0].quick else "")
        if link_base is not None:
            label = f"[{label}]({report_link(link_base, own[0].folder.name)})"
        counts = [sum(row.verdict is v for row in own) for v in Verdict]
        lines.append(f"| {label} | {len(own)} | " + " | ".join(map(str, counts)) + " |")
    counts = [sum(row.verdict is v for row in rows) for v in Verdict]
    lines.append(f"| all | {len(rows)} | " + " | ".join(f"**{n}**" for n in counts) + " |")
    return "\n".join(lines)
