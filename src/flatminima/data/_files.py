"""Shared helpers for the file-based loaders: locating a dataset's folder and raising errors that say what to do.

Nothing is ever downloaded: every loader reads files the user fetched, and when something is missing or broken
the error names the file, the folder that was searched and the official download address.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

__all__ = ["ArchiveSource", "FolderSource", "Source", "corrupt", "find_folder", "folder_hint", "missing"]


def missing(dataset: str, files: Iterable[str], folder: str | os.PathLike[str], url: str, hint: str = "") -> str:
    """Message for a missing folder or file: what was expected, where it was looked for, where to get it."""
    files = list(files)
    them = "them" if len(files) > 1 else "it"
    msg = f"{dataset}: expected {', '.join(files)} in folder '{folder}' but did not find {them}."
    msg += f" Download {them} from {url}"
    return f"{msg} ({hint})" if hint else msg


def corrupt(dataset: str, file: str | os.PathLike[str], problem: str, url: str) -> str:
    """Message for a file that exists but cannot be right (truncated, wrong magic number, bad labels)."""
    return f"{dataset}: file '{file}' looks corrupt or truncated: {problem}. Delete it and download it again from {url}"


def folder_hint(root: str | os.PathLike[str], subfolders: Sequence[str]) -> str:
    """Why nothing was found under ``root``: it does not exist, is a file, or neither it nor its subfolders hold
    the files."""
    base = Path(root).expanduser()
    if not base.exists():
        return "that folder does not exist"
    if not base.is_dir():
        return "that is a file, not a folder: pass the folder holding the files"
    return f"also looked in {', '.join(subfolders)}"


def find_folder(root: str | os.PathLike[str], markers: Sequence[str], subfolders: Sequence[str]) -> Path | None:
    """Return ``root`` or the first ``root/sub`` holding any of ``markers`` (file names, with or without '.gz')."""
    base = Path(root).expanduser()
    for folder in [base, *(base / sub for sub in subfolders)]:
        if any((folder / m).is_file() or (folder / f"{m}.gz").is_file() for m in markers):
            return folder
    return None


class Source:
    """Read-only access to the files of one dataset, whether in a folder or inside a tar archive."""

    location: str

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def path(self, name: str) -> str:
        """Human-readable location of ``name`` for error messages."""
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Release any open archive."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderSource(Source):
    """Files in an extracted folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.location = str(self.folder)

    def exists(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def open(self, name: str) -> IO[bytes]:
        return open(self.folder / name, "rb")

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def size(self, name: str) -> int:
        return (self.folder / name).stat().st_size


class ArchiveSource(Source):
    """Members ``<prefix>/<name>`` of a (possibly gzipped) tar archive, read in memory without extracting.

    Reading members rather than calling ``extractall`` avoids path-traversal attacks by crafted archives and
    leaves no files behind.
    """

    def __init__(self, archive: str | os.PathLike[str], prefix: str) -> None:
        self.archive = Path(archive)
        self.set_prefix(prefix)
        self._tar = tarfile.open(self.archive, "r:*")  # noqa: SIM115 - closed by close()/__exit__
        try:
            members = self._tar.getmembers()
        except BaseException:
            self._tar.close()
            raise
        # './cifar-10-batches-bin/x' and 'cifar-10-batches-bin/x' name the same member
        self._members = {m.name.removeprefix("./"): m for m in members if m.isfile()}

    def set_prefix(self, prefix: str) -> None:
        """Make ``name`` refer to the member ``<prefix>/<name>`` (``''``: the archive's top level)."""
        self.prefix = prefix.strip("/")
        self.location = f"{self.archive}:{self.prefix}/" if self.prefix else str(self.archive)

    def _member(self, name: str) -> tarfile.TarInfo | None:
        return self._members.get(f"{self.prefix}/{name}" if self.prefix else name)

    def exists(self, name: str) -> bool:
        return self._member(name) is not None

    def open(self, name: str) -> IO[bytes]:
        member = self._member(name)
        handle = self._tar.extractfile(member) if member is not None else None
        if handle is None:
            raise FileNotFoundError(self.path(name))
        return handle

    def path(self, name: str) -> str:
        return f"{self.archive}:{self.prefix}/{name}" if self.prefix else f"{self.archive}:{name}"

    def size(self, name: str) -> int:
        member = self._member(name)
        if member is None:
            raise FileNotFoundError(self.path(name))
        return member.size

    def close(self) -> None:
        self._tar.close()
