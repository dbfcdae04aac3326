"""The metrics log: JSON lines (always) and TensorBoard (when installed), written by one process only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "read_metrics"]


class MetricsLog:
    """Append one JSON object per epoch to ``metrics.jsonl``; mirror scalars to TensorBoard if available."""

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.path = folder / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(log_dir=str(folder / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self._tensorboard = None

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop lines of epochs after the checkpoint, so the log matches an uninterrupted run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["epoch"] <= epoch]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(temporary, self.path)  # atomic: a kill here leaves the old log or the new one, never half

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as file:
            file.write(json.dumps(clean) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tensorboard.add_scalar(key, value, record["epoch"])
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (a process killed mid-write) is dropped."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {number + 1}, is not a JSON record; the metrics log is corrupt.") from None
    return records
