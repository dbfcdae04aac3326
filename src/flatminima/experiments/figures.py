"""Figures for the reproductions' reports: one way to open, lay out, save and close a matplotlib figure.

Every reproduction draws PNGs with the Agg backend (no display is needed, on a server or in CI). The figure is
closed even when drawing fails, so a long sweep does not accumulate open figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flatminima.output_folder import save_figure

__all__ = ["DPI", "pyplot", "saved_figure"]

#: Resolution of every report figure.
DPI = 110


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: the package does not need it otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def saved_figure(
    path: Path,
    rows: int = 1,
    columns: int = 1,
    *,
    size: tuple[float, float] = (10.0, 3.8),
    title: str = "",
    title_size: float = 11,
    squeeze: bool = True,
    crop: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(figure, axes)`` of a ``rows`` x ``columns`` grid; on leaving, title and lay it out and save it to
    ``path``. ``crop`` trims the margins to the drawing (for figures whose colour bars or legends stick out)."""
    plt = pyplot()
    figure, axes = plt.subplots(rows, columns, figsize=size, squeeze=squeeze)
    try:
        yield figure, axes
        if title:
            figure.suptitle(title, fontsize=title_size)
        if crop:
            save_figure(figure, path, dpi=DPI, bbox_inches="tight")
        else:
            figure.tight_layout()
            save_figure(figure, path, dpi=DPI)
    finally:
        plt.close(figure)
