"""The linear-operator protocol every estimator takes, and adapters for dense matrices and bare matvec functions.

Modelled on curvlinops' ``CurvatureLinearOperator``: an operator is a square matrix known only through its
products, with a dimension, a dtype and a device. ``matvec`` multiplies one flat vector; ``matmat`` multiplies the
columns of a ``(dim, k)`` matrix, which an operator over a data set (``
HessianOperator``) does in one pass over the data. The estimators (Lanczos, power iteration, Hutchinson, Hutch++,
SLQ) are written against this protocol only, so a dense tensor, a Hessian over a data set or a user's own operator
(a Gauss-Newton matrix, a Fisher) are measured by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "CountingOperator",
    "DenseOperator",
    "LinearOperator",
    "MatvecOperator",
    "OperatorLike",
    "ShiftedOperator",
    "as_operator",
]


@runtime_checkable
class LinearOperator(Protocol):
    """A square ``dim x dim`` matrix, known through its products (estimators assume it is symmetric)."""

    @property
    def dim(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat vector of shape ``(dim,)``."""
        ...

    def matmat(self, matrix: Tensor) -> Tensor:
        """``A V`` for a ``(dim, k)`` matrix: ``k`` products, as cheaply as the operator can do them together.

        ``matrix`` may be a non-contiguous view (the estimators pass their row-major probe blocks transposed, each
        column contiguous), and the result may be one too: call ``.contiguous()`` where a layout is needed."""
        ...


OperatorLike = LinearOperator | Tensor


def _check_columns(matrix: Tensor, dim: int) -> None:
    if matrix.dim() != 2 or matrix.shape[0] != dim:
        raise ValueError(f"expected a matrix of shape ({dim}, k), got {tuple(matrix.shape)}")


class DenseOperator:
    """A dense square tensor as a ``LinearOperator`` (for tests, and for Hessians small enough to store)."""

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"a dense operator needs a square (dim, dim) tensor, got {shape}")
        if not matrix.is_floating_point():
            raise ValueError(f"a dense operator needs a floating tensor, got {matrix.dtype}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device

    def __repr__(self) -> str:
        return f"DenseOperator(dim={self.dim}, dtype={self.dtype})"

    def matvec(self, v: Tensor) -> Tensor:
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of shape ({self.dim},), got {tuple(v.shape)}")
        return self.matrix @ v.to(device=self.device, dtype=self.dtype)

    def matmat(self, matrix: Tensor) -> Tensor:
        _check_columns(matrix, self.dim)
        return self.matrix @ matrix.to(device=self.device, dtype=self.dtype)


class MatvecOperator:
    """An operator from a bare ``matvec`` function (its ``matmat`` multiplies column by column)."""

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        dim: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        if not callable(matvec):
            raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
        self.function = matvec
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)

    def matvec(self, v: Tensor) -> Tensor:
        return self.function(v)

    def matmat(self, matrix: Tensor) -> Tensor:
        _check_columns(matrix, self.dim)
        if matrix.shape[1] == 0:
            return matrix.clone()
        return torch.stack([self.function(column) for column in matrix.T], dim=1)


class _WrappedOperator:
    """An operator built on another: the same ``dim``, ``dtype`` and ``device``, looked up on it at each use."""

    def __init__(self, operator: LinearOperator) -> None:
        self.operator = operator

    @property
    def dim(self) -> int:
        return self.operator.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype

    @property
    def device(self) -> torch.device:
        return self.operator.device


class CountingOperator(_WrappedOperator):
    """Wraps an operator and counts its products (``matmat`` of ``k`` columns counts ``k``): the estimators'
    ``num_hvp``. The products are looked up on the wrapped object at each call, so a patched ``matvec`` is used."""

    def __init__(self, operator: LinearOperator) -> None:
        super().__init__(operator)
        self.num_products = 0

    def matvec(self, v: Tensor) -> Tensor:
        out = self.operator.matvec(v)
        self.num_products += 1
        return out

    def matmat(self, matrix: Tensor) -> Tensor:
        out = self.operator.matmat(matrix)
        self.num_products += int(matrix.shape[1])
        return out


class ShiftedOperator(_WrappedOperator):
    """``A - shift I`` from ``A``'s products: the same eigenvectors, every eigenvalue moved by ``-shift`` (power
    iteration on it finds lambda_max when ``shift`` is ``A``'s most negative eigenvalue)."""

    def __init__(self, operator: OperatorLike, shift: float) -> None:
        if not math.isfinite(shift):
            raise ValueError(f"the shift must be a finite number, got {shift!r}")
        super().__init__(as_operator(operator))
        self.shift = float(shift)

    def matvec(self, v: Tensor) -> Tensor:
        return self.operator.matvec(v) - self.shift * v.to(device=self.device, dtype=self.dtype)

    def matmat(self, matrix: Tensor) -> Tensor:
        return self.operator.matmat(matrix) - self.shift * matrix.to(device=self.device, dtype=self.dtype)


def as_operator(operator: OperatorLike) -> LinearOperator:
    """``operator`` itself when it implements ``LinearOperator``; a ``DenseOperator`` for a tensor."""
    if isinstance(operator, Tensor):
        return DenseOperator(operator)
    if isinstance(operator, LinearOperator):
        return operator
    raise TypeError(
        f"expected a linear operator (dim, dtype, device, matvec, matmat) or a square tensor, "
        f"got {type(operator).__name__}"
    )
