"""The methods compared and their tuning grids, all of the same size (``
equal_sizes``): SGD over learning rate x weight decay, at the SAM runs' epochs and at twice them (the two budgets);
m-SAM for each m from the smallest to the batch (m = the batch is SAM) over rho; RW-SAM over lambda x rho; n-SAM
over rho. The SAM family trains at SGD's chosen learning rate and weight decay.

The radius of m-SAM shrinks with m: a group of m examples gets one normalised ascent of length rho, so each
example's share of it scales as ``rho / sqrt(m)`` when the examples' gradients are nearly orthogonal (as the noise
patches are). The grid of m is therefore ``rho f sqrt(m / batch)`` for the factors ``f``: the same per-example
push at every m, and SAM's grid is ``rho f``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flatminima.experiments.protocol import Budget, Grid, equal_sizes, sgd_epochs

__all__ = [
    "LR_FACTORS",
    "QUICK_LR_FACTORS",
    "QUICK_RHO_FACTORS",
    "RHO_FACTORS",
    "RWSAM_LAMBDAS",
    "SAMPLE",
    "Method",
    "m_values",
    "methods_for",
    "rho_grid",
]

SAMPLE = 256  # training examples tr(V) and the m-sharpness are measured on (at most)
#: SGD's grid: learning rate x {these} times weight decay x {1, 1/10}; the quick run keeps the first lr only
LR_FACTORS = (1.0, 0.5)
QUICK_LR_FACTORS = (1.0,)
WD_FACTORS = (1.0, 0.1)
#: m-SAM's radii are rho x f x sqrt(m / batch); the first factor first (a tie goes to the earlier setting)
RHO_FACTORS = (1.0, 0.5, 2.0, 0.25)
QUICK_RHO_FACTORS = (1.0, 0.5)
#: RW-SAM's Gibbs temperatures, each at SAM's radius factors 1 and 0.5 (the quick run: at factor 1)
RWSAM_LAMBDAS = (1.0, 10.0)


@dataclass(frozen=True)
class Method:
    """One method: its name, the TrainConfig fields it sets, the m of its regulariser ``(rho / 2m) tr(V)`` (None
    for SGD and n-SAM), how many times the SAM runs' epochs it trains, its grid, and whether its grid sits on top
    of SGD's chosen learning rate and weight decay (the SAM family) or is that choice (SGD)."""

    name: str
    fields: dict[str, Any]
    m: int | None
    grid: Grid
    epochs_factor: int = 1
    after_sgd: bool = True
    label: str = field(default="")

    @property
    def sharpness_aware(self) -> bool:
        return self.fields.get("optimizer") != "sgd"


def m_values(batch: int, smallest: int = 1, step: int = 2) -> tuple[int, ...]:
    """The m of m-SAM: the powers of ``step`` from ``smallest`` that divide the batch, then the batch (SAM)."""
    ms = []
    m = 1
    while m < batch:
        if m >= smallest and batch % m == 0:
            ms.append(m)
        m *= step
    return (*ms, batch)


def rho_grid(rho: float, m: int, batch: int, factors: tuple[float, ...]) -> tuple[float, ...]:
    """m-SAM's radii: ``rho f sqrt(m / batch)`` for each factor (4 significant digits)."""
    return tuple(float(f"{rho * f * math.sqrt(m / batch):.4g}") for f in factors)


def methods_for(
    batch: int,
    rho: float,
    lr: float,
    weight_decay: float,
    ms: tuple[int, ...],
    quick: bool,
    train_size: int | None = None,
) -> tuple[Method, ...]:
    """Every method in table order with its grid: SGD, SGD at twice the epochs, m-SAM for each m (the last, m =
    the batch, named ``sam``), RW-SAM, and n-SAM (full run only; its ascent sample is 8 batches, at most
    ``train_size`` examples)."""
    lrs = QUICK_LR_FACTORS if quick else LR_FACTORS
    factors = QUICK_RHO_FACTORS if quick else RHO_FACTORS
    sgd_grid = tuple(
        {"lr": float(f"{lr * a:.4g}"), "weight_decay": float(f"{weight_decay * b:.4g}")}
        for a in lrs
        for b in WD_FACTORS
    )
    methods = [
        Method("sgd", {"optimizer": "sgd"}, None, Grid("sgd", sgd_grid), after_sgd=False, label="SGD"),
        Method(
            "sgd-2x",
            {"optimizer": "sgd"},
            None,
            Grid("sgd-2x", sgd_grid),
            epochs_factor=sgd_epochs(1, Budget.EQUAL_EVALUATIONS),
            after_sgd=False,
            label="SGD, 2x epochs",
        ),
    ]
    for m in ms:
        name = "sam" if m == batch else f"msam-{m}"
        fields: dict[str, Any] = {"optimizer": "sam"} if m == batch else {"optimizer": "sam", "group_size": m}
        grid = Grid(name, tuple({"rho": r} for r in rho_grid(rho, m, batch, factors)))
        methods.append(Method(name, fields, m, grid, label=f"SAM (m = {m})" if m == batch else f"m-SAM, m = {m}"))
    rw_rhos = rho_grid(rho, batch, batch, factors[:1] if quick else factors[:2])
    rw_grid = tuple({"rwsam_lambda": lam, "rho": r} for lam in RWSAM_LAMBDAS for r in rw_rhos)
    methods.append(Method("rwsam", {"optimizer": "rwsam"}, batch, Grid("rwsam", rw_grid), label="RW-SAM"))
    if not quick:
        nsam_grid = tuple({"rho": r} for r in rho_grid(rho, batch, batch, factors))
        sample = 8 * batch if train_size is None else min(8 * batch, train_size)
        nsam = {"optimizer": "nsam", "nsam_sample_size": sample}
        methods.append(Method("nsam", nsam, None, Grid("nsam", nsam_grid), label="n-SAM"))
    equal_sizes(*(method.grid for method in methods))
    return tuple(methods)
