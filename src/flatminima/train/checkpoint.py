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

from flatminima.output_folder import write_failure

__all__ = ["check_resume_state", "check_schedule_steps", "load_checkpoint", "save_checkpoint"]


# how torch's zip writer reports a write that could not complete (a full disk, a file size limit)
_WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter", "inline_container")


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
    except (OSError, RuntimeError) as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, RuntimeError) and not any(word in str(error) for word in _WRITER_FAILURES):
            raise  # not the writer's failure (say, out of memory while gathering the state): keep its own words
        raise OSError(
            f"cannot write {path}: {write_failure(error, path.parent)}; the previous checkpoint, if any, is intact"
        ) from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; a clear error if it is missing or corrupt."""
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _damaged(path: str | Path, detail: str) -> ValueError:
    return ValueError(f"checkpoint {path} is damaged or edited: {detail}; restore it, or start over with --overwrite")


def check_resume_state(state: dict[str, Any], path: str | Path) -> None:
    """Validate, field by field, a checkpoint a run is about to resume from, before anything is loaded or written:
    the epoch in range, a history of one record per epoch, the RNG state a generator's, the world size. Each
    failure names the field and the fix. (``check_schedule_steps`` follows once the config is known to be
    the checkpoint's.)"""

    def damaged(detail: str) -> ValueError:
        return _damaged(path, detail)

    config = state.get("config")
    if not isinstance(config, dict) or not _is_int(config.get("epochs")) or config["epochs"] < 1:
        raise damaged("it holds no training config with a number of epochs")
    epoch = state.get("epoch")
    if not _is_int(epoch) or not 1 <= epoch <= config["epochs"]:
        raise damaged(f"its epoch is {str(epoch)[:40]!s}, not a whole number in [1, {config['epochs']}]")
    history = state.get("history")
    if not isinstance(history, list) or len(history) != epoch:
        length = len(history) if isinstance(history, list) else type(history).__name__
        raise damaged(f"its history has {length} records for {epoch} epochs")
    for index, record in enumerate(history):
        if not isinstance(record, dict) or record.get("epoch") != index + 1:
            raise damaged(f"record {index + 1} of its history is not epoch {index + 1}'s")
    rng = state.get("rng")
    expected = torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != expected.shape:
        found = (
            f"a {str(rng.dtype).removeprefix('torch.')} tensor {tuple(rng.shape)}"
            if isinstance(rng, torch.Tensor)
            else type(rng).__name__
        )
        raise damaged(f"its RNG state is {found}, not a uint8 tensor {tuple(expected.shape)}")
    world_size = state.get("world_size", 1)
    if not _is_int(world_size) or world_size < 1:
        raise damaged(f"its world size is {str(world_size)[:40]}, not a whole number >= 1")


def check_schedule_steps(state: dict[str, Any], path: str | Path, steps_per_epoch: int) -> None:
    """The learning-rate schedule's step count is what the checkpoint's epochs make at ``steps_per_epoch`` (checked
    after the config is known to be unchanged: a new batch size changes the steps per epoch, and is refused as a
    changed setting, not as damage)."""
    epoch = state["epoch"]
    scheduler = state.get("scheduler")
    steps = scheduler.get("last_epoch") if isinstance(scheduler, dict) else None
    if not _is_int(steps) or steps != epoch * steps_per_epoch:
        raise _damaged(
            path,
            f"its learning-rate schedule is at step {str(steps)[:40]}, but {epoch} epochs of {steps_per_epoch} steps "
            f"make {epoch * steps_per_epoch}",
        )
