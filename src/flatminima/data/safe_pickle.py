"""A restricted unpickler for the python-version CIFAR batches.

``pickle.load`` on a downloaded file can run arbitrary code (a pickle may name any importable callable, such as
``os.system``).  The CIFAR batches only need plain containers and numpy arrays, so ``RestrictedUnpickler``
resolves exactly the globals those need and refuses everything else with ``RefusedGlobalError`` (a
``pickle.UnpicklingError``).
"""

from __future__ import annotations

import pickle
from typing import IO, Any

__all__ = ["ALLOWED_GLOBALS", "RefusedGlobalError", "RestrictedUnpickler", "restricted_load"]

_BUILTINS = ("list", "dict", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float")

#: (module, name) pairs a pickle may reference.  Lists, dicts, str, bytes, int and float have their own pickle
#: opcodes and need no global; the entries below cover numpy arrays under every pickle protocol and numpy version.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        # ndarray.__reduce__ (protocols 0-4): _reconstruct(ndarray, shape, dtype-char) + __setstate__
        ("numpy.core.multiarray", "_reconstruct"),  # written by numpy < 2
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # ndarray.__reduce_ex__ with protocol 5 (Python >= 3.14's default): _frombuffer(buffer, dtype, shape, order)
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # Python 3 pickles bytes as _codecs.encode(str, 'latin1') under protocols 0-2
        ("_codecs", "encode"),
        # constructors of plain builtin values (Python 2 pickles name the module '__builtin__')
        *(("builtins", name) for name in _BUILTINS),
        *(("__builtin__", name) for name in _BUILTINS),
    }
)


class RefusedGlobalError(pickle.UnpicklingError, ValueError):
    """A pickle referenced a global outside ``ALLOWED_GLOBALS``; nothing from it was called. (A ValueError
    too: a bad input file, which the command line reports in one line.)"""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only ``ALLOWED_GLOBALS``.

    Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, arbitrary classes, ...) raises
    ``RefusedGlobalError`` naming it, before anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise RefusedGlobalError(
            f"refused to load global '{module}.{name}': only plain containers and numpy arrays are allowed "
            "(a pickle naming other callables can run arbitrary code)"
        )


def restricted_load(file: IO[bytes], encoding: str = "latin1") -> Any:
    """Unpickle one object from ``file`` with ``RestrictedUnpickler``.

    ``encoding='latin1'`` decodes Python 2 byte strings (the official CIFAR pickles were written by Python 2)
    the way numpy expects for array data.
    """
    return RestrictedUnpickler(file, encoding=encoding).load()
