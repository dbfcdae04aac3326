"""What a finished run leaves for people: a short markdown summary and a figure of its curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flatminima.output_folder import save_figure, write_atomically

__all__ = ["plot_curves", "write_summary"]


def plot_curves(histories: dict[str, list[dict[str, Any]]], path: Path, key: str = "test_accuracy") -> Path:
    """One line per run of ``key`` against epoch (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        axis.plot([r["epoch"] for r in history], [100 * r[key] for r in history], label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel(key.replace("_", " ") + " (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    plt.close(figure)
    return path


def write_summary(folder: Path, config: dict[str, Any], history: list[dict[str, Any]], figure: Path) -> Path:
    last = history[-1]
    best = max(r["test_accuracy"] for r in history)
    lines = [
        f"# {config['optimizer']} on {config['dataset']} ({config['model']})",
        "",
        f"- epochs: {last['epoch']}, final train loss {last['train_loss']:.4f}",
        f"- test accuracy: final {100 * last['test_accuracy']:.2f} %, best {100 * best:.2f} %",
    ]
    if "val_accuracy" in last:
        lines.append(f"- validation accuracy: final {100 * last['val_accuracy']:.2f} %")
    lines += ["", f"![test accuracy]({figure.name})", "", "Config: `config.yaml`; per-epoch metrics: `metrics.jsonl`."]
    path = folder / "summary.md"
    write_atomically(path, "\n".join(lines) + "\n")
    return path
