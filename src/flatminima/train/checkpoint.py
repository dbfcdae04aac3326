"""Checkpoints written atomically and read without unpickling arbitrary objects.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over the old one,
so a run killed mid-write leaves the previous checkpoint intact. It is read with ``torch.load(weights_only=True)``:
tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; start without --resume, or point --output at the run.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise RuntimeError(
            f"checkpoint {path} is corrupt or not a flatminima checkpoint ({type(error).__name__}: {error}). "
            "Delete it to start over, or restore it from a backup."
        ) from error
    if not isinstance(state, dict) or "model" not in state:
        raise RuntimeError(f"checkpoint {path} holds no model state; it was not written by flatminima train.")
    return state
