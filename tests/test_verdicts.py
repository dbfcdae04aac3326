"""The table of every claim and its verdict: read from the reproductions' results.json files, refused where a file
is not a reproduction's, and the README's copy kept equal to the stored full runs'."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flatminima.cli import main
from flatminima.experiments.protocol import Claim, Verdict
from flatminima.experiments.verdicts import collect, verdict_summary, verdict_table

ROOT = Path(__file__).resolve().parent.parent


def _write(folder: Path, name: str, claims: list[Claim], quick: bool = False) -> None:
    (folder / name).mkdir(parents=True)
    results = {"reproduction": name, "quick": quick, "claims": [c.as_dict() for c in claims]}
    (folder / name / "results.json").write_text(json.dumps(results))


def test_the_table_has_a_row_per_claim_and_counts_the_verdicts(tmp_path: Path) -> None:
    _write(tmp_path, "b-repro", [Claim("B holds", "+1 [0.5, 1.5]", "rule", Verdict.SUPPORTS)])
    _write(
        tmp_path,
        "a-repro",
        [
            Claim("A holds | really", "-2 [-3, -1]", "rule", Verdict.CONTRADICTS),
            Claim("A' holds", "0 [-1, 1]", "rule", Verdict.INCONCLUSIVE),
        ],
        quick=True,
    )
    rows = collect(tmp_path)
    assert [(r.reproduction, r.verdict) for r in rows] == [
        ("a-repro", Verdict.CONTRADICTS),
        ("a-repro", Verdict.INCONCLUSIVE),
        ("b-repro", Verdict.SUPPORTS),
    ]
    table = verdict_table(rows, link_base="docs")
    lines = table.splitlines()
    assert (
        lines[2] == "| [a-repro (quick)](docs/a-repro/report.md) | A holds \\| really | -2 [-3, -1] | **CONTRADICTS** |"
    )
    assert lines[-1] == "SUPPORTS: 1, CONTRADICTS: 1, INCONCLUSIVE: 1 (of 3 claims)."


def test_folders_without_verdicts_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        collect(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no reproduction's results\.json"):
        collect(tmp_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"reproduction": "old"}))
    with pytest.raises(ValueError, match="no 'claims'"):
        collect(tmp_path)


def test_cli_verdicts_prints_the_table_and_all_refuses_per_run_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path, "x", [Claim("X holds", "1", "rule", Verdict.SUPPORTS)])
    assert main(["reproduce", "--verdicts", str(tmp_path)]) == 0
    assert "| x | X holds | 1 | **SUPPORTS** |" in capsys.readouterr().out
    for extra, named in ((["--seeds", "1"], "--seeds"), (["--rho", "0.1"], "--rho"), (["sam-cycle"], "a NAME")):
        assert main(["reproduce", "--all", "--quick", *extra]) != 0
        assert f"--all does not take {named}" in capsys.readouterr().err
    assert main(["reproduce", "--verdicts", str(tmp_path), "--quick", "--overwrite"]) != 0
    assert "--verdicts does not take --quick, --overwrite" in capsys.readouterr().err
    assert main(["reproduce", "--verdicts", str(tmp_path), "--summary"]) == 0
    assert "| x | 1 | 1 | 0 | 0 |" in capsys.readouterr().out
    assert main(["reproduce", "--all", "--summary"]) != 0
    assert "--all does not take --summary" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("page", "summary", "link_base"),
    [
        ("README.md", True, "https://flatminima.readthedocs.io/en/latest/reproductions/{name}/report/"),
        ("docs/reproductions.md", False, "reproductions"),
    ],
)
def test_the_docs_tables_are_the_stored_full_runs_table(page: str, summary: bool, link_base: str) -> None:
    """The README's verdict counts and the reproductions page's table of every claim are generated: `flatminima
    reproduce --verdicts docs/reproductions [--summary]`, linked from where each page lies."""
    text = (ROOT / page).read_text()
    found = re.search(r"<!-- verdicts: begin[^>]*-->\n(.*?)\n<!-- verdicts: end -->", text, re.S)
    assert found, f"{page} marks its verdict table with <!-- verdicts: begin ... --> and <!-- verdicts: end -->"
    stored = collect(ROOT / "docs" / "reproductions")
    assert not any(row.quick for row in stored), "the stored reproductions are full runs"
    made = verdict_summary if summary else verdict_table
    assert found.group(1) == made(stored, link_base=link_base)


def test_the_summary_counts_each_reproductions_verdicts(tmp_path: Path) -> None:
    _write(tmp_path, "b", [Claim("B", "1", "rule", Verdict.SUPPORTS), Claim("B'", "0", "rule", Verdict.INCONCLUSIVE)])
    _write(tmp_path, "a", [Claim("A", "-1", "rule", Verdict.CONTRADICTS)], quick=True)
    assert verdict_summary(collect(tmp_path)).splitlines()[2:] == [
        "| a (quick) | 1 | 0 | 1 | 0 |",
        "| b | 2 | 1 | 0 | 1 |",
        "| all | 3 | **1** | **1** | **1** |",
    ]


def test_all_runs_every_reproduction_into_its_folder_and_prints_the_verdicts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import flatminima.experiments.reproduce as runner

    ran = []

    def fake(name: str, found: Verdict) -> runner.Reproduction:
        def run(ctx: runner.Context) -> runner.Outcome:
            ran.append((name, ctx.quick, ctx.output))
            return runner.Outcome(["x"], [[1]], {}, claims=[Claim(f"{name} holds", "1", "rule", found)])

        return runner.Reproduction(name, f"{name} summary", "a paper", run)

    fakes = {"one": fake("one", Verdict.SUPPORTS), "two": fake("two", Verdict.CONTRADICTS)}
    monkeypatch.setattr(runner, "available", lambda: fakes)
    assert main(["reproduce", "--all", "--quick", "--output", str(tmp_path)]) == 0
    assert ran == [("one", True, tmp_path / "one"), ("two", True, tmp_path / "two")]
    out = capsys.readouterr().out
    table = out[out.index("## Every claim and its verdict") :]
    assert "| one (quick) | one holds | 1 | **SUPPORTS** |" in table
    assert "| two (quick) | two holds | 1 | **CONTRADICTS** |" in table
    assert (tmp_path / "verdicts.md").read_text().startswith("| reproduction | claim | measured | verdict |")
    saved = json.loads((tmp_path / "two" / "results.json").read_text())
    assert saved["claims"][0]["verdict"] == "CONTRADICTS"
    assert saved["command"] == f"flatminima reproduce --all --quick --output {tmp_path}"
    assert "## Verdicts\n\n- **CONTRADICTS**: two holds." in (tmp_path / "two" / "report.md").read_text()
    # a second run into the same folder replaces its own files; a folder of someone else's is refused, and with
    # --overwrite left alone and left out of the table (only the reproductions just run are read)
    assert main(["reproduce", "--all", "--quick", "--output", str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "results.json").write_text("{}")
    assert main(["reproduce", "--all", "--quick", "--output", str(tmp_path)]) != 0
    assert "did not write (theirs)" in capsys.readouterr().err
    assert main(["reproduce", "--all", "--quick", "--output", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "theirs" / "results.json").read_text() == "{}"
    assert "theirs" not in (tmp_path / "verdicts.md").read_text()
