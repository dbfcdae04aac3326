"""One policy for every command's output folder: checked before any work, owned for the run's lifetime.

* **The user's files are safe.** A folder may hold only what flatminima wrote there: the names listed in its
  manifest (``.flatminima-files``, updated when a command ends) and, for ``train``, a run's own files. A folder
  holding anything else is refused before any work starts, unless the user passes ``--overwrite`` (then files of
  the same names as the command's are replaced and the others are left alone).
* **One run per folder.** The command holds an exclusive lock (``.flatminima.lock``, an ``flock`` released by the
  kernel when the process ends, however it ends) for its lifetime; a second command into the same folder is
  refused with one line naming the holder's PID.
* **Writes are atomic**: ``write_atomically`` writes a temporary file beside the target and renames it over.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "FolderInUseError",
    "FolderLock",
    "OutputFolder",
    "save_figure",
    "write_atomically",
    "write_failure",
]

LOCK_NAME = ".flatminima.lock"
MANIFEST_NAME = ".flatminima-files"
_OWN = frozenset({LOCK_NAME, MANIFEST_NAME})


class FolderInUseError(RuntimeError):
    """Another flatminima command holds the output folder."""


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a reader (or a crash)
    never sees half a file; the file gets the permissions of a normally created one."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file private; results are for everyone to read
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        if error.errno in _NO_ROOM:
            raise OSError(f"cannot write {path}: {write_failure(error, path.parent)}") from error
        raise
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_figure(figure: Any, path: Path, **options: Any) -> None:
    """Save a matplotlib ``figure`` as a PNG at ``path`` atomically: rendered in memory, then written as
    ``write_atomically`` writes (a failed write leaves the previous figure, never half a new one)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **options)
    write_atomically(Path(path), buffer.getvalue())


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each entry's (inode, size, modification time): what tells a file this command wrote from one it found."""
    found = {}
    for entry in os.scandir(folder):
        stat = entry.stat(follow_symlinks=False)
        found[entry.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return found


class FolderLock:
    """An exclusive lock on a folder for one process's lifetime (the kernel drops it when the process ends, however
    it ends); a second holder is refused with one line naming the first one's PID."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: int | None = None
        #: when the previous holder took the lock (ns), or None if no command ever held it; set by acquire()
        self.previous_start: int | None = None
        self._created = False

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (the other guarantees hold)
            return
        lock_path = self.path / LOCK_NAME
        try:
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._created = True
        except FileExistsError:
            handle = os.open(lock_path, os.O_RDWR)
            self._created = False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise FolderInUseError(
                f"--output {self.path} is in use by another flatminima command (PID {holder}); wait for it to end "
                "or choose another --output."
            ) from None
        self.previous_start = None if self._created else os.fstat(handle).st_mtime_ns
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        self._handle = handle

    def release(self, *, remove_if_new: bool = False) -> None:
        """Let the folder go; ``remove_if_new``: also delete the lock file if this lock created it (a command that
        was refused leaves nothing in the user's folder)."""
        if self._handle is not None:
            if remove_if_new and self._created:
                with contextlib.suppress(OSError):
                    (self.path / LOCK_NAME).unlink()
            with contextlib.suppress(OSError):
                os.close(self._handle)  # closing the descriptor releases the flock
            self._handle = None


class OutputFolder:
    """The output folder of one command (``command``: its name in messages, e.g. ``"reproduce"``).

    Use as a context manager, around all the command's work::

        with OutputFolder(path, "sharpness", overwrite=args.overwrite) as folder:
            ...  # write into folder.path
    """

    def __init__(self, path: str | Path, command: str, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.command = command
        self.overwrite = overwrite
        self._lock = FolderLock(self.path)
        self._claimed = False
        self._before: dict[str, tuple[int, int, int]] = {}

    # ------------------------------------------------------------------ claiming and releasing

    def __enter__(self) -> OutputFolder:
        self.claim()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is None:
            self.release()
        else:  # the command's own error is the one to report, not a failure to record its files
            with contextlib.suppress(OSError):
                self.release()

    def claim(self) -> None:
        """Create the folder, take its lock and refuse files the command did not write (unless ``overwrite``)."""
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"--output {self.path} is a file, not a folder; choose another --output.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(f"cannot create --output {self.path}: {error.strerror}; choose another folder.") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise PermissionError(f"--output {self.path} is not writable; choose another folder.")
        self._lock.acquire()
        try:
            foreign = self.foreign_files()
            if foreign and not self.overwrite:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise FileExistsError(
                    f"--output {self.path} holds files that flatminima {self.command} did not write ({shown}); "
                    "choose another --output, or pass --overwrite."
                )
            self._before = _snapshot(self.path)
            self._claimed = True
        except BaseException:
            self._lock.release(remove_if_new=True)
            raise

    def release(self) -> None:
        """Record what the command wrote in the manifest, then let the folder go."""
        if not self._claimed:
            return
        self._claimed = False
        try:
            after = _snapshot(self.path)
            written = {name for name, stamp in after.items() if self._before.get(name) != stamp}
            owned = (self.manifest() | written) & set(after)
            names = sorted(n for n in owned - _OWN if not n.endswith(".tmp"))
            write_atomically(self.path / MANIFEST_NAME, "".join(f"{name}\n" for name in names))
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ what the folder holds

    def _unrecorded(self) -> set[str]:
        """The entries written by a command that began here and never recorded them (see foreign_files)."""
        started = self._lock.previous_start
        if started is None:
            return set()
        try:
            if (self.path / MANIFEST_NAME).stat().st_mtime_ns >= started:
                return set()  # the last command ended and recorded what it wrote
        except FileNotFoundError:
            pass
        return {
            entry.name for entry in os.scandir(self.path) if entry.stat(follow_symlinks=False).st_mtime_ns >= started
        }

    def manifest(self) -> set[str]:
        """The names earlier flatminima commands wrote into this folder."""
        try:
            return {line for line in (self.path / MANIFEST_NAME).read_text().splitlines() if line}
        except (FileNotFoundError, UnicodeDecodeError):
            return set()

    def foreign_files(self) -> list[str]:
        """The entries that no flatminima command wrote (temporary files of an interrupted write excepted).

        A command killed outright (SIGKILL, power loss) could not record its files; its lock file says when it
        began, and a manifest older than that says it did not end: what was written since is its own."""
        known = self.manifest() | _OWN | self._unrecorded()
        return sorted(
            entry.name
            for entry in os.scandir(self.path)
            if entry.name not in known and not (entry.name.startswith(".") and entry.name.endswith(".tmp"))
        )


def write_failure(error: BaseException, folder: Path) -> str:
    """Why a write into ``folder`` failed, in words (torch reports a full disk as "unexpected pos" from its zip writer,
    Python a file size limit as "File too large")."""
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (or the quota used up); free space or choose another --output"
    if code == errno.EFBIG:
        return "the file size limit is reached (ulimit -f); raise it or write elsewhere"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < _LOW_SPACE:
        return f"the disk is full ({free // 1024} KiB free); free space or choose another --output"
    limit = _file_size_limit()
    if limit is not None:
        return f"the write stopped at the file size limit, it seems (ulimit -f: {limit} bytes)"
    return f"the write failed ({' '.join(str(error).split())[:120]})"


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write failed for want of room, not of permission
_LOW_SPACE = 64 * 2**20  # less than this left after a failed write: the disk is what ran out


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft
