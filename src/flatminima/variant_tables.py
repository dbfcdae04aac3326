"""The optimiser registry as markdown tables: ``flatminima variants --markdown`` and the docs' generated tables.

The docs do not keep their own list of optimisers or of the variants' flags: a block of a docs page between

    <!-- generated: NAME -->
    <!-- end generated -->

is the table ``NAME`` of ``TABLES``, made from the registry (the built-in variants and every installed plugin).
``python3 -m flatminima.variant_tables docs/*.md`` rewrites the blocks; the docs tests fail, naming that command,
when a page's block differs from what the registry makes now (a variant added, an option's default changed).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TABLES", "optimizers_table", "options_table", "rewrite_generated", "stale_blocks"]

_BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)


def _specs() -> list[Any]:
    import flatminima.variants  # noqa: F401  (the built-in variants register on import)
    from flatminima.optim.registry import optimizer_names, optimizer_spec

    return [optimizer_spec(name) for name in optimizer_names()]


def _kind(spec: Any) -> str:
    if spec.batch_rule is not None:
        return "`SharpnessAwareStep` (batch rule)"
    if getattr(spec, "trajectory", None) is not None:
        return "`PlainStep` (trajectory loss)"
    return "any SAM driver" if spec.sharpness_aware else "plain step"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _flag(field: dataclasses.Field, kind: type) -> str:
    flag = "--" + field.name.replace("_", "-")
    return f"`{flag}` / `--no-{flag[2:]}`" if kind is bool else f"`{flag}`"


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float) and math.isinf(value):
        return "`inf`"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def optimizers_table() -> str:
    """Every registered optimiser: its name, summary, passes per step, the drivers that run it, the module that
    registered it and its options' flags."""
    lines = [
        "| `--optimizer` | what it is | passes per step | runs under | registered by | options |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in _specs():
        fields = dataclasses.fields(spec.options) if spec.options is not None else ()
        options = ", ".join(f"`--{f.name.replace('_', '-')}`" for f in fields)
        lines.append(
            f"| `{spec.name}` | {_escape(spec.help)} | {_escape(spec.passes)} | {_kind(spec)} | `{spec.module}` "
            f"| {options or '-'} |"
        )
    return "\n".join(lines)


def options_table() -> str:
    """Every variant's own option: its flag, YAML key, default, the optimisers that read it, what values it takes
    and its help text."""
    import typing

    specs = _specs()
    lines = [
        "| Flag | YAML key | Default | Read by | Accepts | What it does |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    seen: set[str] = set()
    for spec in specs:
        if spec.options is None:
            continue
        hints = typing.get_type_hints(spec.options)
        for field in dataclasses.fields(spec.options):
            if field.name in seen:
                continue
            seen.add(field.name)
            readers = ", ".join(
                f"`{other.name}`"
                for other in specs
                if other.options is not None and field.name in {f.name for f in dataclasses.fields(other.options)}
            )
            choices = field.metadata.get("choices")
            kind = hints[field.name]
            if choices:
                accepts = " or ".join(f"`{c}`" for c in choices)
            elif kind is bool:
                accepts = "`true` or `false`"
            else:
                accepts = field.metadata.get("why", "").removeprefix("must be ") or f"any {kind.__name__}"
            help_text = field.metadata["help"]
            prefix = re.match(r"^[a-z0-9/-]+: ", help_text)  # the help names its optimisers; the table has a column
            lines.append(
                f"| {_flag(field, kind)} | `{field.name}` | {_default(field.default)} | {readers} "
                f"| {_escape(accepts)} | {_escape(help_text[prefix.end() if prefix else 0 :])} |"
            )
    return "\n".join(lines)


#: The tables a docs page can embed, by block name.
TABLES: dict[str, Callable[[], str]] = {"optimizers": optimizers_table, "variant-options": options_table}


def rewrite_generated(text: str) -> str:
    """``text`` with every generated block replaced by its table as the registry makes it now; an unknown block
    name is an error."""

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise ValueError(f"unknown generated block {name!r}; known: {', '.join(TABLES)}")
        return f"{match[1]}{TABLES[name]()}\n{match[4]}"

    return _BLOCK.sub(fill, text)


def stale_blocks(text: str) -> list[str]:
    """The names of the generated blocks of ``text`` that differ from what the registry makes now."""
    fresh = {m["name"]: m["body"] for m in _BLOCK.finditer(rewrite_generated(text))}
    return [m["name"] for m in _BLOCK.finditer(text) if m["body"] != fresh[m["name"]]]


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the generated blocks of the given pages (``--check``: only report the stale ones, exit 1)."""
    parser = argparse.ArgumentParser(prog="python3 -m flatminima.variant_tables", description=main.__doc__)
    parser.add_argument("pages", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = False
    for page in args.pages:
        text = page.read_text()
        names = stale_blocks(text)
        if names and not args.check:
            page.write_text(rewrite_generated(text))
        for name in names:
            print(f"{page}: {'stale' if args.check else 'rewrote'} block {name!r}")
        stale = stale or bool(names)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
