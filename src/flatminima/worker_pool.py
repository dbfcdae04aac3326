"""Worker processes that never outlive their command: the pool the demo and the reproductions train in.

A command that trains in several processes must stop all of them when it stops, however it stops:

* **Ctrl-C, SIGTERM, an error in a worker**: ``worker_pool`` cancels the jobs not yet started, terminates the
  workers (then kills those that do not exit) and waits for them, before the exception goes on, so that the
  caller's temporary folders are removed after the last writer is gone.
* **The command killed outright** (SIGKILL, a crash): each worker asks the kernel (Linux ``PR_SET_PDEATHSIG``) for
  SIGTERM when its parent dies, so none is left running under PID 1.

The CLI turns SIGTERM into ``Terminated``, an exception, so that a ``kill`` runs the same clean-up as Ctrl-C.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

__all__ = ["Terminated", "terminated_as_exception", "worker_pool"]

_PR_SET_PDEATHSIG = 1
_JOIN_SECONDS = 10.0


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM: unwinds as Ctrl-C does (``finally`` blocks, context managers), exit 143."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated()


@contextlib.contextmanager
def terminated_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread (the CLI runs each command so); the
    previous handler is back afterwards. Off the main thread, where Python cannot set handlers, nothing changes."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _die_with_parent() -> None:
    """Worker initialiser: SIGTERM when the parent dies (Linux); SIGTERM's default action; and Ctrl-C ignored (the
    terminal sends it to the whole process group: the parent stops its workers, without a traceback from each)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes; leaving the block by an
    exception stops every worker before the exception goes on (see the module's docstring)."""
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent
    )
    try:
        yield pool
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started, terminate the workers, and wait until every one is gone, and the pool's
    manager thread too (left running, it races the interpreter's exit for its wake-up pipe: "Exception ignored ...
    Bad file descriptor" at exit, now and then)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        process.join(_JOIN_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
    if manager is not None:
        manager.join(_JOIN_SECONDS)  # it ends once it sees the workers gone
