"""``escape-sharp``: from a sharp global minimum, Ahn et al.'s perturbations walk down tr(H) along the minima.

Ahn, Jadbabaie and Sra (ICML 2024) measure flatness by ``tr(H) / d`` and give two algorithms that, once the
gradient is small, add ``-eta' v`` to the gradient step, ``v`` the part orthogonal to ``grad f(x)`` of a gradient
taken at a randomly perturbed point (:mod:`flatminima.variants.escape`): Algorithm 1 (``ahn-rs``) perturbs along
a uniform random direction, Algorithm 2 (``ahn-sa``) along one random example's normalised gradient with a
random sign. Both drifts follow ``-grad tr(H)`` along the set of minima; Algorithm 2's is ``d`` times larger at the
same ``rho`` and ``eta'``. Plain GD does not move at a minimum (its gradient is zero there).

The problem: a two-layer linear network with one output, ``p(x) = w2^T W1 x`` (``W1``: h x k, ``w2``: h), fitted by
``L = 1/(2n) sum_i (p(x_i) - y_i)^2`` to ``n > k`` examples of a linear target ``y_i = beta^T x_i``; ``d = h (k + 1)``.
With ``Sigma = X^T X / n`` (full rank):

* the minima (``L = 0``) are the manifold ``W1^T w2 = beta``, of dimension ``d - k``;
* ``tr(H) = tr(W1 Sigma W1^T) + ||w2||^2 tr(Sigma)`` at every point, not only at minima (each ``d^2 p_i`` has a zero
  diagonal, so the residual term of the Hessian is traceless);
* on the manifold, with ``a = ||w2||``, ``q = w2 / a`` and ``W1 = q beta^T / a + R`` (``R^T q = 0``),
  ``tr(H) = beta^T Sigma beta / a^2 + tr(R Sigma R^T) + a^2 tr(Sigma) >= 2 sqrt(beta^T Sigma beta tr(Sigma))``, with
  equality iff ``R = 0`` and ``a^2 = sqrt(beta^T Sigma beta / tr(Sigma))``: the flattest minima are the balanced
  factorisations ``(a* q, q beta^T / a*)``, a sphere of directions ``q``;
* the distance from ``(w2, W1)`` to that sphere is
  ``sqrt(||w2||^2 + ||W1||^2 + a*^2 + ||beta||^2 / a*^2 - 2 ||a* w2 + W1 beta / a*||)``;
* at a minimum the nonzero eigenvalues of ``H = J^T J / n`` are those of ``Sigma^1/2 (W1^T W1 + a^2 I) Sigma^1/2``,
  so ``lambda_max`` over the manifold is smallest at ``R = 0`` and the ``a`` that minimises
  ``lambda_max(Sigma^1/2 (beta beta^T / a^2 + a^2 I) Sigma^1/2)`` (found numerically): SAM's target, not the
  trace's.

The inputs are whitened (``Sigma = I`` exactly, so ``tr(H)_min = 2 sqrt(k) ||beta||`` and ``a*^2 = ||beta|| /
sqrt(k)``). Every run starts from the same sharp minimum (``a = a* / 2`` and an ``R`` that adds ``tr(H)_min`` to
the trace: ``tr(H) = 3.125 tr(H)_min``) and uses the library's optimisers in float64: ``torch.optim.SGD`` through
:class:`~flatminima.PlainStep` (GD), :class:`~flatminima.SAM` through :class:`~flatminima.SharpnessAwareStep` (SAM,
``ahn-rs``, ``ahn-sa``). ``tr(H)`` is the trace of the dense Hessian from ``torch.autograd.functional.hessian``,
checked against the closed form.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.batch_rules import BatchRule, Sample
from flatminima.experiments.reproduce import Context, Outcome, Reproduction, markdown_table
from flatminima.optim import SAM, DualNorm, RandomDirection
from flatminima.step import PlainStep, SharpnessAwareStep
from flatminima.variants import OrthogonalEscape, RandomSign, SingleExample

__all__ = [
    "ALGORITHMS",
    "PROBLEM",
    "REPRODUCTION",
    "SETTINGS",
    "Problem",
    "RandomSubset",
    "Run",
    "Settings",
    "TwoLayerLinear",
    "dense_hessian",
    "exact_interpolation",
    "make_problem",
    "make_step",
    "nearest_minimum",
    "run",
    "run_algorithm",
]

ALGORITHMS = ("GD", "SAM", "ahn-rs", "ahn-sa")
_DTYPE = torch.float64


# ---------------------------------------------------------------- the problem and its closed forms


@dataclass(frozen=True)
class Problem:
    """A realisable regression by ``p(x) = w2^T W1 x``, its sharp starting minimum and the closed forms."""

    inputs: Tensor  # (n, k)
    targets: Tensor  # (n,)
    beta: Tensor  # (k,), the target: y = beta^T x
    hidden: int  # h
    w2_start: Tensor  # (h,)
    W1_start: Tensor  # (h, k)

    @property
    def covariance(self) -> Tensor:
        """``Sigma = X^T X / n``."""
        return self.inputs.T @ self.inputs / self.inputs.shape[0]

    @property
    def dim(self) -> int:
        """``d = h (k + 1)``, the number of parameters."""
        return self.hidden * (self.inputs.shape[1] + 1)

    @property
    def flattest_scale(self) -> float:
        """``a* = ||w2||`` of the flattest minima: ``a*^2 = sqrt(beta^T Sigma beta / tr(Sigma))``."""
        sigma = self.covariance
        return (float(self.beta @ sigma @ self.beta) / float(torch.trace(sigma))) ** 0.25

    @property
    def trace_min(self) -> float:
        """The smallest ``tr(H)`` over the minima: ``2 sqrt(beta^T Sigma beta tr(Sigma))``."""
        sigma = self.covariance
        return 2.0 * math.sqrt(float(self.beta @ sigma @ self.beta) * float(torch.trace(sigma)))

    def trace(self, w2: Tensor, W1: Tensor) -> float:
        """``tr(H) = tr(W1 Sigma W1^T) + ||w2||^2 tr(Sigma)``, exact at every point."""
        sigma = self.covariance
        return float(torch.sum((W1 @ sigma) * W1) + w2.pow(2).sum() * torch.trace(sigma))

    def trace_off_balance(self, w2: Tensor, W1: Tensor) -> float:
        """``tr(R Sigma R^T)`` at a minimum: its ``tr(H)`` less ``beta^T Sigma beta / a^2 + a^2 tr(Sigma)``, the part
        of the trace that the scale ``a = ||w2||`` alone does not set."""
        sigma, a2 = self.covariance, float(w2.pow(2).sum())
        return self.trace(w2, W1) - float(self.beta @ sigma @ self.beta) / a2 - a2 * float(torch.trace(sigma))

    def distance_to_flattest(self, w2: Tensor, W1: Tensor) -> float:
        """Euclidean distance from ``(w2, W1)`` to the sphere of flattest minima ``{(a* q, q beta^T / a*)}``."""
        a = self.flattest_scale
        b = self.beta / a
        square = w2.pow(2).sum() + W1.pow(2).sum() + a * a + b.pow(2).sum()
        square = square - 2.0 * torch.linalg.vector_norm(a * w2 + W1 @ b)
        return math.sqrt(max(float(square), 0.0))

    def lambda_max_at_minimum(self, scale: float) -> float:
        """``lambda_max`` of the minimum ``(scale q, q beta^T / scale)`` (``R = 0``): the top eigenvalue of
        ``Sigma^1/2 (beta beta^T / scale^2 + scale^2 I) Sigma^1/2``."""
        root = _sqrtm(self.covariance)
        inner = torch.outer(self.beta, self.beta) / scale**2 + scale**2 * torch.eye(len(self.beta), dtype=_DTYPE)
        return float(torch.linalg.eigvalsh(root @ inner @ root)[-1])

    def lambda_max_min(self) -> tuple[float, float]:
        """The smallest ``lambda_max`` over the minima and the ``||w2||`` where it is reached (golden-section
        search in ``log a``; ``R = 0`` there, since ``R^T R`` only adds to ``W1^T W1``)."""
        low, high = math.log(self.flattest_scale / 10.0), math.log(self.flattest_scale * 10.0)
        ratio = (math.sqrt(5.0) - 1.0) / 2.0
        for _ in range(100):
            left, right = high - ratio * (high - low), low + ratio * (high - low)
            if self.lambda_max_at_minimum(math.exp(left)) <= self.lambda_max_at_minimum(math.exp(right)):
                high = right
            else:
                low = left
        scale = math.exp((low + high) / 2.0)
        return self.lambda_max_at_minimum(scale), scale


def _sqrtm(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(0.0).sqrt()) @ vectors.T


def make_problem(
    seed: int = 0,
    n: int = 12,
    k: int = 4,
    hidden: int = 3,
    sharpness: float = 2.0,
    extra: float = 1.0,
    whiten: bool = True,
) -> Problem:
    """``n`` Gaussian inputs in ``R^k`` (whitened: ``X^T X / n = I``), a unit target ``beta`` and the sharp start
    ``w2 = (a* / sharpness) q``, ``W1 = q beta^T / ||w2|| + R``, ``R`` a random matrix with ``R^T q = 0`` scaled so
    that ``tr(R Sigma R^T) = extra * tr(H)_min`` (the part of the sharpness that the balance alone does not
    remove)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, k, generator=gen, dtype=_DTYPE)
    if whiten:
        inputs = inputs @ torch.linalg.inv(_sqrtm(inputs.T @ inputs / n))
    beta = torch.randn(k, generator=gen, dtype=_DTYPE)
    beta = beta / torch.linalg.vector_norm(beta)
    q = torch.randn(hidden, generator=gen, dtype=_DTYPE)
    q = q / torch.linalg.vector_norm(q)
    shell = Problem(inputs, inputs @ beta, beta, hidden, q, torch.outer(q, beta))
    scale = shell.flattest_scale / sharpness
    raw = torch.randn(hidden, k, generator=gen, dtype=_DTYPE)
    residual = raw - torch.outer(q, q @ raw)
    residual = residual * math.sqrt(
        extra * shell.trace_min / float(torch.sum((residual @ shell.covariance) * residual))
    )
    return Problem(inputs, inputs @ beta, beta, hidden, scale * q, torch.outer(q, beta) / scale + residual)


class TwoLayerLinear(nn.Module):
    """``p(x) = w2^T W1 x``, float64, initialised at the problem's sharp minimum."""

    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.w2 = nn.Parameter(problem.w2_start.clone())
        self.W1 = nn.Parameter(problem.W1_start.clone())

    def forward(self, inputs: Tensor) -> Tensor:
        return (inputs @ self.W1.T) @ self.w2


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example ``(p - y)^2 / 2`` (``reduction="none"``, as Algorithm 2's single-example passes need)."""
    return 0.5 * (outputs - targets) ** 2


def _unflatten(flat: Tensor, hidden: int) -> tuple[Tensor, Tensor]:
    return flat[:hidden], flat[hidden:].reshape(hidden, -1)


def _loss_of(problem: Problem) -> Callable[[Tensor], Tensor]:
    def loss(flat: Tensor) -> Tensor:
        w2, W1 = _unflatten(flat, problem.hidden)
        return squared_error((problem.inputs @ W1.T) @ w2, problem.targets).mean()

    return loss


def dense_hessian(problem: Problem, w2: Tensor, W1: Tensor) -> Tensor:
    """The ``d x d`` Hessian of the mean loss at ``(w2, W1)`` (``torch.autograd.functional.hessian``, float64)."""
    flat = torch.cat([w2.detach().reshape(-1), W1.detach().reshape(-1)])
    return torch.autograd.functional.hessian(_loss_of(problem), flat)


def nearest_minimum(problem: Problem, w2: Tensor, W1: Tensor, iterations: int = 50) -> tuple[Tensor, Tensor]:
    """A minimum next to ``(w2, W1)``: minimum-norm Gauss-Newton steps on ``W1^T w2 = beta`` (a measuring device:
    where along the manifold a run that stays near it has got to, to first order the orthogonal projection)."""
    flat = torch.cat([w2.detach().reshape(-1), W1.detach().reshape(-1)])

    def constraint(z: Tensor) -> Tensor:
        v2, V1 = _unflatten(z, problem.hidden)
        return V1.T @ v2 - problem.beta

    for _ in range(iterations):
        residual = constraint(flat)
        if float(torch.linalg.vector_norm(residual)) < 1e-15:
            break
        jacobian = torch.func.jacrev(constraint)(flat)
        flat = flat - jacobian.T @ torch.linalg.solve(jacobian @ jacobian.T, residual)
    return _unflatten(flat, problem.hidden)


# ---------------------------------------------------------------- the algorithms, from the library


@dataclass(frozen=True)
class Settings:
    """The step sizes: ``lr`` (eta, every algorithm), the radius ``rho`` (SAM and Ahn et al.'s), Ahn et al.'s
    ``eta'`` (absolute, not a multiple of ``lr``) and their gradient-norm switch ``epsilon`` (``inf``: perturb on
    every step, the library's default).

    ``lr lambda_max = 0.23`` at the start: a small step (GD is stable up to 2). ``rho = 0.5`` is a third of ``||w||``
    at the flattest minima, a large radius, but the drifts along the minima are exact in ``rho`` for this model (a
    quartic loss, a bilinear network) and larger radii buy more drift per kick; ``eta' = 0.001`` keeps ``ahn-sa``'s
    loss below ~1e-2 along the run.
    """

    lr: float = 0.02
    rho: float = 0.5
    eta_prime: float = 0.001
    epsilon: float = math.inf


class RandomSubset(BatchRule):
    """Both extra passes of Algorithm 2 on ``size`` examples drawn without replacement from the batch (a new draw
    every step): :class:`~flatminima.variants.SingleExample` for a mini-batch, for the batch-size experiment. The
    gradient at ``x`` that ``OrthogonalEscape`` projects against stays the whole batch's."""

    def __init__(self, size: int, generator: torch.Generator | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1; got {size}")
        self.size, self.generator = size, generator
        self.index: Tensor | None = None

    def ascent_sample(self, inputs: Tensor, targets: Tensor, step: int) -> Sample | None:
        self.index = torch.randperm(inputs.shape[0], generator=self.generator)[: self.size]
        return inputs[self.index], targets[self.index]

    def descent_sample(self, inputs: Tensor, targets: Tensor) -> Sample | None:
        return inputs[self.index], targets[self.index]


def make_step(
    name: str, model: nn.Module, settings: Settings, seed: int, batch_size: int = 1
) -> Callable[[Tensor, Tensor], Tensor]:
    """The library's step for ``name`` (one of :data:`ALGORITHMS`) on ``model``; ``seed`` fixes the random draws
    (directions, signs, examples); ``batch_size`` is the number of examples of ``ahn-sa``'s extra passes."""
    lr, rho = settings.lr, settings.rho
    if name == "GD":
        return PlainStep(model, squared_error, torch.optim.SGD(model.parameters(), lr=lr))
    if name == "SAM":
        return SharpnessAwareStep(model, squared_error, SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr))
    escape = OrthogonalEscape(settings.epsilon, settings.eta_prime, relative=False)
    if name == "ahn-rs":
        ascent = RandomDirection(torch.Generator().manual_seed(seed))
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, perturbation=ascent, descent=escape)
        return SharpnessAwareStep(model, squared_error, opt)
    if name == "ahn-sa":
        ascent = RandomSign(DualNorm(2.0), torch.Generator().manual_seed(seed))
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, perturbation=ascent, descent=escape)
        examples = torch.Generator().manual_seed(10_000 + seed)
        rule = SingleExample(examples) if batch_size == 1 else RandomSubset(batch_size, examples)
        return SharpnessAwareStep(model, squared_error, opt, batch_rule=rule)
    raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")


@dataclass
class Run:
    """One run: the recorded curve and the final measurements."""

    algorithm: str
    seed: int
    batch_size: int
    steps: list[int] = field(default_factory=list)
    trace: list[float] = field(default_factory=list)  # tr(H) of the dense Hessian
    loss: list[float] = field(default_factory=list)
    lambda_max: list[float] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)  # to the flattest minima
    final: dict[str, float] = field(default_factory=dict)


def record_steps(steps: int, count: int = 120) -> list[int]:
    """``count`` steps spaced evenly over ``[0, steps]``, and the first 20 steps (the first perturbations)."""
    return sorted({round(i * steps / count) for i in range(count + 1)} | set(range(min(steps, 20))))


def run_algorithm(
    problem: Problem, name: str, settings: Settings, steps: int, seed: int = 0, batch_size: int = 1
) -> Run:
    """``steps`` steps of ``name`` from the sharp minimum on the whole data set each step; records ``tr(H)``, the
    loss and the distance to the flattest minima along the way, and at the end also ``lambda_max`` and the nearest
    minimum's ``tr(H)`` and distance. The largest loss is taken over every step (the loss at ``x`` that each step
    returns), the curves at :func:`record_steps`."""
    model = TwoLayerLinear(problem)
    step = make_step(name, model, settings, seed, batch_size)
    result = Run(name, seed, batch_size)
    passes = {"forward": 0}

    def count(module: nn.Module, args: Any) -> None:
        passes["forward"] += 1

    model.register_forward_pre_hook(count)
    perturbed = 0  # steps with more than the one pass at x: the ascent was taken
    inputs, targets = problem.inputs, problem.targets
    due = set(record_steps(steps))
    worst = 0.0  # largest |tr(dense Hessian) - closed form| over the recorded steps
    loss_max, loss_max_step = 0.0, 0  # over every step
    for t in range(steps + 1):
        if t in due:
            w2, W1 = model.w2.detach(), model.W1.detach()
            hessian = dense_hessian(problem, w2, W1)
            with torch.no_grad():
                loss = float(squared_error(model(inputs), targets).mean())
            result.steps.append(t)
            result.trace.append(float(torch.trace(hessian)))
            result.loss.append(loss)
            result.lambda_max.append(float(torch.linalg.eigvalsh(hessian)[-1]))
            worst = max(worst, abs(result.trace[-1] - problem.trace(w2, W1)))
            result.distance.append(problem.distance_to_flattest(w2, W1))
        if t < steps:
            before = passes["forward"]
            loss = float(step(inputs, targets))  # the loss at x_t, before the step
            perturbed += passes["forward"] - before > 1
            if loss > loss_max:
                loss_max, loss_max_step = loss, t
    w2, W1 = model.w2.detach(), model.W1.detach()
    near_w2, near_W1 = nearest_minimum(problem, w2, W1)
    result.final = {
        "trace": result.trace[-1],
        "trace_closed_form_error": worst,
        "loss": result.loss[-1],
        "loss_max": max(loss_max, result.loss[-1]),
        "loss_max_step": float(loss_max_step if loss_max >= result.loss[-1] else steps),
        "lambda_max": result.lambda_max[-1],
        "perturbed_fraction": perturbed / steps,
        "displacement": float(
            torch.linalg.vector_norm(torch.cat([w2 - problem.w2_start, (W1 - problem.W1_start).reshape(-1)]))
        ),
        "distance_to_flattest": result.distance[-1],
        "trace_nearest_minimum": problem.trace(near_w2, near_W1),
        "distance_nearest_minimum_to_flattest": problem.distance_to_flattest(near_w2, near_W1),
        "scale_nearest_minimum": float(torch.linalg.vector_norm(near_w2)),
        "trace_off_balance_nearest_minimum": problem.trace_off_balance(near_w2, near_W1),
        "step_to_nearest_minimum": float(
            torch.linalg.vector_norm(torch.cat([(near_w2 - w2).reshape(-1), (near_W1 - W1).reshape(-1)]))
        ),
    }
    return result


# ---------------------------------------------------------------- the reproduction


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], digits: int = 4) -> str:
    """``mean ± standard deviation`` over seeds, or the single value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{_mean(values):.{digits}g} ± {_spread(values):.1g}"


PROBLEM: dict[str, Any] = {"seed": 0, "n": 12, "k": 4, "hidden": 3, "sharpness": 2.0, "extra": 1.0, "whiten": True}
SETTINGS = Settings()


@dataclass(frozen=True)
class Variant:
    """One row: an algorithm with its settings; ``seeded`` runs once per seed (the random algorithms)."""

    label: str
    algorithm: str
    settings: Settings = SETTINGS
    batch_size: int = 1
    seeded: bool = True


def variants(n: int) -> tuple[list[Variant], list[Variant]]:
    """The main rows, and the batch-size rows of ``ahn-sa`` (batch 1 is the main ``ahn-sa`` row)."""
    main = [
        Variant("GD", "GD", seeded=False),
        Variant("SAM", "SAM", seeded=False),
        Variant("ahn-rs", "ahn-rs"),
        Variant("ahn-sa", "ahn-sa"),
        Variant("ahn-rs, eta' x 8", "ahn-rs", Settings(SETTINGS.lr, SETTINGS.rho, 8 * SETTINGS.eta_prime)),
        Variant("ahn-sa, epsilon 1e-3", "ahn-sa", Settings(SETTINGS.lr, SETTINGS.rho, SETTINGS.eta_prime, 1e-3)),
    ]
    batch = [Variant(f"ahn-sa, batch {b}", "ahn-sa", batch_size=b) for b in (3, n)]
    return main, batch


def _runs(ctx: Context, problem: Problem, variant: Variant, steps: int) -> list[Run]:
    seeds = ctx.seeds if variant.seeded else ctx.seeds[:1]
    runs = []
    for seed in seeds:
        started = time.perf_counter()
        result = run_algorithm(problem, variant.algorithm, variant.settings, steps, seed, variant.batch_size)
        runs.append(result)
        ctx.progress(
            f"escape-sharp: {variant.label}, seed {seed}: tr(H) {result.trace[0]:.4g} -> {result.trace[-1]:.4g} "
            f"in {steps} steps ({time.perf_counter() - started:.1f} s)"
        )
    return runs


def _summary(runs: list[Run]) -> dict[str, Any]:
    """Mean, standard deviation and per-seed values of the final measurements of ``runs``."""
    finals = [r.final for r in runs]
    out: dict[str, Any] = {"runs": len(runs), "seeds": [r.seed for r in runs]}
    for key in finals[0]:
        values = [f[key] for f in finals]
        out[key] = {"mean": _mean(values), "std": _spread(values), "per_seed": values}
    return out


def _loss_at_start(problem: Problem) -> float:
    """The mean loss at the problem's starting minimum (float64 rounding: ~1e-32)."""
    with torch.no_grad():
        return float(squared_error(TwoLayerLinear(problem)(problem.inputs), problem.targets).mean())


def exact_interpolation(steps: int = 100) -> dict[str, float]:
    """How far each algorithm moves in ``steps`` steps from a minimum where every residual is exactly 0 in float64
    (small integer data, a dyadic factorisation): there ``grad f_i = 0`` for every example, so the normalised
    ascents of SAM and ``ahn-sa`` are zero (``DualNorm`` maps a zero gradient to a zero perturbation)."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(-3, 4, (12, 4), generator=gen).to(_DTYPE)
    beta = torch.tensor([1.0, -2.0, 0.0, 1.0], dtype=_DTYPE)
    q = torch.tensor([1.0, 0.0, 0.0], dtype=_DTYPE)
    problem = Problem(inputs, inputs @ beta, beta, 3, 0.5 * q, torch.outer(q, beta) / 0.5)
    if _loss_at_start(problem) != 0.0:
        raise RuntimeError("the dyadic start should interpolate every example exactly")
    return {name: run_algorithm(problem, name, SETTINGS, steps).final["displacement"] for name in ALGORITHMS}


def _reference_row(label: str, trace: float, lambda_max: float, distance: float, loss: str) -> list[Any]:
    """A row that is a point, not a run: the start, or a closed-form minimum (there the minimum is the point)."""
    return [label, "", f"{trace:.4g}", f"{trace:.4g}", f"{lambda_max:.4g}", f"{distance:.3g}", loss, "", ""]


def _row(label: str, runs: list[Run]) -> list[Any]:
    """A table row: the final measurements of ``runs`` (mean ± sd over seeds; losses: the largest)."""
    finals = [r.final for r in runs]

    def values(key: str) -> list[float]:
        return [f[key] for f in finals]

    return [
        label,
        len(runs),
        _cell(values("trace")),
        _cell(values("trace_nearest_minimum")),
        _cell(values("lambda_max")),
        _cell(values("distance_to_flattest"), 3),
        f"{max(values('loss')):.1e}",
        f"{max(values('loss_max')):.1e}",
        f"{_mean(values('perturbed_fraction')):.2f}",
    ]


def _plot_main(ctx: Context, problem: Problem, runs: dict[str, list[Run]], references: dict[str, float]) -> Any:
    """tr(H)/d, lambda_max, the loss and the distance to the flattest minima over steps, one line per row (mean
    over seeds, the band their range; no band for the loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = problem.dim
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        (axes[0, 0], "trace", 1.0 / d, "tr(H) / d"),
        (axes[0, 1], "lambda_max", 1.0, "lambda_max(H)"),
        (axes[1, 0], "loss", 1.0, "training loss"),
        (axes[1, 1], "distance", 1.0, "distance to the flattest minima"),
    ]
    for index, (label, group) in enumerate(runs.items()):
        steps = group[0].steps
        colour = f"C{index}"
        for axis, key, factor, _ in panels:
            curves = torch.tensor([getattr(r, key) for r in group], dtype=_DTYPE) * factor
            if key == "loss":
                curves = curves.clamp_min(1e-16)
            axis.plot(steps, curves.mean(0), color=colour, linewidth=1.2, label=f"{label} ({len(group)})")
            if len(group) > 1 and key != "loss":  # the loss fluctuates step to step: its band would hide the lines
                axis.fill_between(steps, curves.min(0).values, curves.max(0).values, color=colour, alpha=0.2)
    axes[0, 0].axhline(references["trace_min"] / d, color="k", linestyle="--", linewidth=0.8)
    axes[0, 0].axhline(references["trace_at_lambda_min"] / d, color="grey", linestyle=":", linewidth=0.8)
    axes[0, 1].axhline(references["lambda_max_min"], color="grey", linestyle=":", linewidth=0.8)
    axes[0, 1].axhline(references["lambda_max_at_flattest"], color="k", linestyle="--", linewidth=0.8)
    axes[1, 0].set_yscale("log")
    for axis, _, _, title in panels:
        axis.set_xlim(0, runs["GD"][0].steps[-1])
        axis.set_xlabel("step")
        axis.set_title(title, fontsize=10)
    axes[0, 0].legend(fontsize=7, title="dashed: flattest minima; dotted: smallest lambda_max", title_fontsize=7)
    axes[1, 0].text(0.02, 0.03, "GD: ~1e-32, at the floor (1e-16)", transform=axes[1, 0].transAxes, fontsize=7)
    figure.suptitle("From a sharp global minimum: tr(H) and lambda_max along the minima set", fontsize=11)
    figure.tight_layout()
    path = ctx.figure_path("trace_and_loss.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_batch(ctx: Context, problem: Problem, runs: dict[int, list[Run]], references: dict[str, float]) -> Any:
    """``ahn-sa`` with its extra passes on 1, a few and all examples: tr(H)/d and lambda_max over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for index, (size, group) in enumerate(runs.items()):
        steps = group[0].steps
        for axis, key, factor in ((left, "trace", 1.0 / problem.dim), (right, "lambda_max", 1.0)):
            curves = torch.tensor([getattr(r, key) for r in group], dtype=_DTYPE) * factor
            axis.plot(steps, curves.mean(0), color=f"C{index}", linewidth=1.2, label=f"batch {size} ({len(group)})")
            if len(group) > 1:
                axis.fill_between(steps, curves.min(0).values, curves.max(0).values, color=f"C{index}", alpha=0.2)
    left.axhline(references["trace_min"] / problem.dim, color="k", linestyle="--", linewidth=0.8)
    left.axhline(references["trace_at_lambda_min"] / problem.dim, color="grey", linestyle=":", linewidth=0.8)
    right.axhline(references["lambda_max_min"], color="grey", linestyle=":", linewidth=0.8)
    right.axhline(references["lambda_max_at_flattest"], color="k", linestyle="--", linewidth=0.8)
    for axis, title in ((left, "tr(H) / d"), (right, "lambda_max(H)")):
        axis.set_xlim(0, runs[1][0].steps[-1])
        axis.set_xlabel("step")
        axis.set_title(f"ahn-sa, extra passes on a batch of b examples: {title}", fontsize=9)
    left.legend(fontsize=8, title="dashed: flattest; dotted: smallest lambda_max", title_fontsize=7)
    figure.tight_layout()
    path = ctx.figure_path("batch_size.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(ctx: Context) -> Outcome:
    """Every row from the same sharp minimum, the same number of steps at the same learning rate: GD and SAM once
    (deterministic), the random algorithms once per seed; then ``ahn-sa`` with its extra passes on 3 and on all
    examples; then the exact-interpolation check. Figures: the curves of every row, and of the batch sizes."""
    problem = make_problem(**PROBLEM)
    steps = 2000 if ctx.quick else 6000
    n = problem.inputs.shape[0]
    main, batch = variants(n)
    runs = {v.label: _runs(ctx, problem, v, steps) for v in main}
    batch_runs = {1: runs["ahn-sa"]} | {v.batch_size: _runs(ctx, problem, v, steps) for v in batch}

    start_hessian = dense_hessian(problem, problem.w2_start, problem.W1_start)
    trace_start = float(torch.trace(start_hessian))
    lambda_min, lambda_scale = problem.lambda_max_min()
    q = problem.w2_start / torch.linalg.vector_norm(problem.w2_start)
    at_lambda_min = (lambda_scale * q, torch.outer(q, problem.beta) / lambda_scale)
    references = {
        "trace_min": problem.trace_min,
        "trace_at_lambda_min": problem.trace(*at_lambda_min),
        "lambda_max_min": lambda_min,
        "lambda_max_at_flattest": problem.lambda_max_at_minimum(problem.flattest_scale),
    }
    d = problem.dim
    rows = [
        _reference_row(
            "start: the sharp minimum",
            trace_start,
            float(torch.linalg.eigvalsh(start_hessian)[-1]),
            problem.distance_to_flattest(problem.w2_start, problem.W1_start),
            f"{_loss_at_start(problem):.1e}",
        ),
        *(_row(label, group) for label, group in runs.items()),
        _reference_row(
            "flattest minima (closed form)", problem.trace_min, references["lambda_max_at_flattest"], 0.0, "0"
        ),
        _reference_row(
            "minima of smallest lambda_max (closed form)",
            references["trace_at_lambda_min"],
            lambda_min,
            problem.distance_to_flattest(*at_lambda_min),
            "0",
        ),
    ]
    batch_rows = []
    batch_effect: dict[str, Any] = {}
    for size, group in batch_runs.items():
        decrease = [trace_start - r.final["trace_nearest_minimum"] for r in group]
        batch_rows.append(
            [
                f"{size}" + (" (all)" if size == n else ""),
                len(group),
                _cell([r.final["trace_nearest_minimum"] for r in group]),
                _cell(decrease),
                _cell([r.final["lambda_max"] for r in group]),
                _cell([r.final["distance_to_flattest"] for r in group], 3),
                f"{max(r.final['loss'] for r in group):.1e}",
            ]
        )
        batch_effect[str(size)] = {
            "trace_decrease_mean": _mean(decrease),
            "trace_decrease_std": _spread(decrease),
            "trace_decrease_per_seed": decrease,
            **_summary(group),
        }
    summaries = {label: _summary(group) for label, group in runs.items()}

    def means(key: str) -> dict[str, float]:
        return {label: s[key]["mean"] for label, s in summaries.items()}

    gd = runs["GD"][0].final
    results = {
        "problem": {**PROBLEM, "d": d},
        "settings": {
            "lr": SETTINGS.lr,
            "rho": SETTINGS.rho,
            "eta_prime": SETTINGS.eta_prime,
            "eta_prime_relative": False,
            "epsilon": SETTINGS.epsilon,
            "variants": {v.label: vars(v.settings) | {"batch_size": v.batch_size} for v in main + batch},
        },
        "steps": steps,
        "trace_start": trace_start,
        "trace_start_over_d": trace_start / d,
        "trace_min_on_manifold": problem.trace_min,
        "trace_min_over_d": problem.trace_min / d,
        "flattest_scale": problem.flattest_scale,
        "lambda_max_start": float(torch.linalg.eigvalsh(start_hessian)[-1]),
        "smallest_curvature_start": float(min(v for v in torch.linalg.eigvalsh(start_hessian) if v > 1e-9)),
        "lambda_max_min_on_manifold": lambda_min,
        "lambda_max_min_scale": lambda_scale,
        "lambda_max_at_flattest": references["lambda_max_at_flattest"],
        "trace_at_lambda_max_min": references["trace_at_lambda_min"],
        "distance_start": problem.distance_to_flattest(problem.w2_start, problem.W1_start),
        "trace_off_balance_start": problem.trace_off_balance(problem.w2_start, problem.W1_start),
        "trace_final": means("trace"),
        "trace_nearest_minimum": means("trace_nearest_minimum"),
        "distance_to_flattest": means("distance_to_flattest"),
        "lambda_max_final": means("lambda_max"),
        "loss_final": {label: max(s["loss"]["per_seed"]) for label, s in summaries.items()},
        "loss_max_along_run": {label: max(s["loss_max"]["per_seed"]) for label, s in summaries.items()},
        "perturbed_fraction": means("perturbed_fraction"),
        "gd_relative_trace_change": abs(gd["trace"] - trace_start) / trace_start,
        "gd_displacement": gd["displacement"],
        "hessian_trace_vs_closed_form_max_error": max(
            r.final["trace_closed_form_error"] for group in [*runs.values(), *batch_runs.values()] for r in group
        ),
        "batch_size_effect": batch_effect,
        "exact_interpolation_displacement": exact_interpolation(),
        "runs": summaries,
    }
    figures = [_plot_main(ctx, problem, runs, references), _plot_batch(ctx, problem, batch_runs, references)]
    batch_table = markdown_table(
        [
            "batch of the extra passes",
            "runs",
            "tr(H), nearest minimum",
            "tr(H) decrease",
            "lambda_max",
            "distance to flattest",
            "loss end (max)",
        ],
        batch_rows,
    )
    report = _report(results, batch_table, steps)
    return Outcome(
        headers=[
            "",
            "runs",
            "tr(H) end",
            "tr(H), nearest minimum",
            "lambda_max end",
            "distance to flattest",
            "loss end (max)",
            "loss max along run",
            "perturbed steps",
        ],
        rows=rows,
        results=results,
        report=report,
        figures=figures,
        caption=(
            f"{steps} steps from the same sharp minimum, lr {SETTINGS.lr}; rho {SETTINGS.rho}, eta' "
            f"{SETTINGS.eta_prime}, epsilon {SETTINGS.epsilon} unless the row says otherwise. tr(H) of the dense "
            f"Hessian (d = {d}); mean ± standard deviation over seeds."
        ),
    )


def _report(results: dict[str, Any], batch_table: str, steps: int) -> str:
    """The commentary: what each row shows, with the run's own numbers."""
    r = results
    d, start, tmin = r["problem"]["d"], r["trace_start"], r["trace_min_on_manifold"]
    near, lam, loss_max = r["trace_nearest_minimum"], r["lambda_max_final"], r["loss_max_along_run"]
    rs8, eps = "ahn-rs, eta' x 8", "ahn-sa, epsilon 1e-3"

    def removed(label: str) -> str:
        fraction = (start - near[label]) / (start - tmin)
        return f"{fraction:.0%}" if fraction < 0.99 else f"{fraction:.1%}"

    batch = r["batch_size_effect"]
    best = max(batch, key=lambda b: batch[b]["trace_decrease_mean"])
    full = list(batch)[-1]
    decreases = ", ".join(f"b = {b}: {batch[b]['trace_decrease_mean']:.3g}" for b in batch)
    exact = r["exact_interpolation_displacement"]
    slow = r["settings"]["lr"] * r["smallest_curvature_start"]
    faster = (
        "faster than both"
        if near["ahn-sa"] < min(near["ahn-rs"], near[rs8])
        else "faster than ahn-rs at the same settings, not than ahn-rs at 8 eta'"
    )
    sa_runs = r["runs"]["ahn-sa"]
    peaks = ", ".join(f"{step:.0f}" for step in sa_runs["loss_max_step"]["per_seed"])
    first_kick = (
        f"The largest loss at any step is {loss_max['ahn-sa']:.1e} (at steps {peaks}), {r['loss_final']['ahn-sa']:.1e}"
        " at the end: the kick of a step is, to first order, `+-eta' rho ||grad p_i|| grad p_i`, across the valley "
        "and largest while the minimum is sharp."
    )
    lam_min = r["lambda_max_min_on_manifold"]
    sam = r["runs"]["SAM"]
    sam_reach = "reaches" if abs(lam["SAM"] - lam_min) <= 0.05 * lam_min else "approaches"
    one, all_ = batch["1"], batch[full]
    if (
        abs(all_["lambda_max"]["mean"] - lam_min) < abs(one["lambda_max"]["mean"] - lam_min)
        and all_["trace_nearest_minimum"]["mean"] > one["trace_nearest_minimum"]["mean"]
    ):
        where = (
            "and the run heads for the minima of smallest lambda_max, as SAM does: it ends with lambda_max "
            f"{all_['lambda_max']['mean']:.4g} (b = 1: {one['lambda_max']['mean']:.4g}; smallest over the minima "
            f"{lam_min:.4g}) but tr(H) {all_['trace_nearest_minimum']['mean']:.4g} (b = 1: "
            f"{one['trace_nearest_minimum']['mean']:.4g}). With one example `E[v]` is `rho^2 / 2 grad tr(H)`. Every "
            "batch size escapes; they differ in where they go."
        )
    else:
        where = (
            "but at this horizon the runs have not yet separated by target (lambda_max "
            f"{all_['lambda_max']['mean']:.4g} with all examples, {one['lambda_max']['mean']:.4g} with one); the full "
            "run shows where each goes."
        )
    return f"""
Every row starts at the same sharp global minimum (tr(H) = {start:.4g}, tr(H)/d = {start / d:.3g}, lambda_max =
{r["lambda_max_start"]:.4g}) and takes {steps} steps at lr = {r["settings"]["lr"]} on the whole data set; the random
algorithms once per seed. tr(H) is the trace of the dense float64 Hessian (it matches the closed form to
{r["hessian_trace_vs_closed_form_max_error"]:.0e}); "nearest minimum" is where minimum-norm Gauss-Newton steps on
`W1^T w2 = beta` land from the last iterate, i.e. how far along the minima set the run got (the paper finishes
Algorithm 2 with plain GD for the same purpose); the distance is the last iterate's to the sphere of flattest
minima; "perturbed steps" is the fraction of steps that took the ascent (the others were plain gradient steps,
by the epsilon switch).

- **GD does not move**: relative change of tr(H) {r["gd_relative_trace_change"]:.1e}, displacement
  {r["gd_displacement"]:.1e} (the gradient at the start is float64 rounding).
- **ahn-sa (Algorithm 2)** removes {removed("ahn-sa")} of the excess tr(H) - tr(H)_min: its nearest minimum has
  tr(H) = {near["ahn-sa"]:.4g} against the closed-form minimum {tmin:.4g}, at distance
  {r["distance_to_flattest"]["ahn-sa"]:.3g} from the flattest minima (start: {r["distance_start"]:.3g}). {first_kick}
- **ahn-rs (Algorithm 1)** at the same rho and eta' removes {removed("ahn-rs")}: at a minimum the part of `E[v]`
  along the minima is `rho^2 / (2d) grad tr(H)` for Algorithm 1 and `rho^2 / 2 grad tr(H)` for Algorithm 2, d = {d}
  times larger (both exact here, for any rho: the loss is a quartic polynomial, the network bilinear). Its kicks
  are smaller too (largest loss {loss_max["ahn-rs"]:.1e}), so it affords a larger eta': at 8 eta' (largest loss
  {loss_max[rs8]:.1e}, about ahn-sa's) it removes {removed(rs8)}. Algorithm 2 is {faster}.
- **SAM** leaves the sharp minimum too, and its lambda_max {sam_reach} the smallest lambda_max over the minima
  ({lam["SAM"]:.4g} against the closed form {r["lambda_max_min_on_manifold"]:.4g}), but that is not the flattest
  minimum in trace. SAM's nearest minimum has `||w2|| = {sam["scale_nearest_minimum"]["mean"]:.3g}` (the scale of
  smallest lambda_max is {r["lambda_max_min_scale"]:.3g}, the flattest `a* = {r["flattest_scale"]:.3g}`) and keeps
  `tr(R Sigma R^T) = {sam["trace_off_balance_nearest_minimum"]["mean"]:.3g}` of the {r["trace_off_balance_start"]:.3g}
  it started with (`ahn-sa`: {sa_runs["trace_off_balance_nearest_minimum"]["mean"]:.2g}), the part that does not set
  lambda_max: tr(H) = {near["SAM"]:.4g}, against {r["trace_at_lambda_max_min"]:.4g} at the minimum of smallest
  lambda_max with `R = 0` and {tmin:.4g} at the flattest. Its loss is not near 0 on the way (largest
  {loss_max["SAM"]:.1e}): it bounces across the valley, as in `sam-cycle`.
- **The switch epsilon**: with epsilon = 1e-3 instead of inf, only {r["perturbed_fraction"][eps]:.0%} of the steps
  perturb, and the run removes {removed(eps)}. After each perturbation plain GD must bring ||grad f|| below epsilon,
  which takes many steps along the flat normal directions (the smallest nonzero curvature at the start is
  {r["smallest_curvature_start"]:.3g}, so `lr lambda = {slow:.2g}` per step); and with the gradient that small, the
  projection removes the slowest normal direction, not the sharp one, so every perturbation is a full kick. The
  library's default (inf) is the better choice on this problem.

**Batch size** (`ahn-sa` with both extra passes on b examples drawn without replacement, the projection against
the full gradient, b = 1 being Algorithm 2 itself; same settings and steps):

{batch_table}

Decrease of tr(H) (start minus nearest minimum, mean over seeds): {decreases}; batch {best} decreases it most.
With all {full} examples the ascent follows the full gradient, which near a minimum points along the top of the
Hessian, {where}

**An exact minimum.** From a minimum where every residual is exactly 0 in float64 (small integer data and a
dyadic factorisation, 100 steps), the displacements are: GD {exact["GD"]:.1e}, SAM {exact["SAM"]:.1e}, ahn-sa
{exact["ahn-sa"]:.1e}, ahn-rs {exact["ahn-rs"]:.1e}. Algorithm 2's ascent `grad f_i / ||grad f_i||` is undefined
where `grad f_i = 0`, and `DualNorm` maps it to 0, so `ahn-sa` stays put like GD. In the main problem the
residuals are rounding (~1e-16) and `grad f_i = r_i grad p_i`, so the normalised direction is exactly
`+-grad p_i / ||grad p_i||` and the random sign makes the residual's sign irrelevant: the algorithm works as
intended. Perturbing along `grad p_i / ||grad p_i||` (the output's gradient) would also move from an exact minimum.
"""


REPRODUCTION = Reproduction(
    name="escape-sharp",
    summary="Escaping a sharp minimum with random perturbations: tr(H) decreases along the minima set",
    paper="Ahn, Jadbabaie, Sra, How to Escape Sharp Minima with Random Perturbations (ICML 2024), Alg. 1 and 2",
    run=run,
)
