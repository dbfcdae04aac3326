"""The docs' tables of optimisers and options are made from the registry, and the docs hold the current ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from flatminima.cli import main
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer, unregister_optimizer
from flatminima.variant_tables import main as rewrite_pages
from flatminima.variant_tables import optimizers_table, options_table, rewrite_generated, stale_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("page", ["cli.md", "variants.md"])
def test_the_docs_tables_are_the_registry_s(page: str) -> None:
    text = (DOCS / page).read_text()
    assert "<!-- generated: " in text
    assert stale_blocks(text) == [], f"run: python3 -m flatminima.variant_tables docs/{page}"


@dataclass(frozen=True)
class _TableOptions:
    table_test_width: int = option(3, "table-test: how wide", check=lambda v: v >= 1, why="must be >= 1")
    table_test_shape: str = option("round", "table-test: which shape", choices=("round", "square"))
    table_test_loud: bool = option(False, "table-test: shout")


def _build(request: OptimizerRequest):
    return request.sam()


def test_a_new_variant_and_its_options_reach_the_tables() -> None:
    before = "<!-- generated: optimizers -->\nold\n<!-- end generated -->\n"
    register_optimizer(
        "table-test", "a variant for the tables", _build, sharpness_aware=True, passes="2", options=_TableOptions
    )
    try:
        rows = optimizers_table().splitlines()
        row = next(r for r in rows if r.startswith("| `table-test`"))
        assert "a variant for the tables | 2 | any SAM driver" in row
        assert "`--table-test-width`, `--table-test-shape`, `--table-test-loud`" in row
        options = options_table()
        assert "| `--table-test-width` | `table_test_width` | `3` | `table-test` | >= 1 | how wide |" in options
        assert "| `round` or `square` | which shape |" in options
        assert "| `--table-test-loud` / `--no-table-test-loud` | `table_test_loud` | `false` |" in options
        assert stale_blocks(before) == ["optimizers"]
        assert "| `table-test` |" in rewrite_generated(before)
    finally:
        unregister_optimizer("table-test")
    assert "table-test" not in optimizers_table()


def test_rewriting_pages_and_checking_them(tmp_path: Path, capsys) -> None:
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- generated: variant-options -->\nstale\n<!-- end generated -->\noutro\n")
    assert rewrite_pages([str(page), "--check"]) == 1
    assert "stale block 'variant-options'" in capsys.readouterr().out
    assert page.read_text().count("stale") == 1  # --check changes nothing
    assert rewrite_pages([str(page)]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- end generated -->\noutro\n")
    assert "`--looksam-k`" in text and stale_blocks(text) == []
    assert rewrite_pages([str(page), "--check"]) == 0
    with pytest.raises(ValueError, match="unknown generated block 'nope'"):
        rewrite_generated("<!-- generated: nope -->\n<!-- end generated -->")


def test_flatminima_variants_markdown(capsys) -> None:
    assert main(["variants", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| `--optimizer` |") and "| `--gsam-alpha` | `gsam_alpha` | `0.01` | `gsam` |" in out
