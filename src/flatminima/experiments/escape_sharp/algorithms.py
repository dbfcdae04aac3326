"""The algorithms of ``escape-sharp``, all from the library: GD, SAM and Ahn et al.'s Algorithms 1 and 2 as
``PlainStep`` / ``SharpnessAwareStep`` over ``SAM``, and one
run of each from the sharp minimum with its curves and final measurements. Only computes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.batch_rules import BatchRule, Sample
from flatminima.experiments.escape_sharp.problem import (
    DTYPE,
    Problem,
    TwoLayerLinear,
    dense_hessian,
    loss_at_start,
    nearest_minimum,
    squared_error,
)
from flatminima.optim import SAM, DualNorm, RandomDirection
from flatminima.step import PlainStep, SharpnessAwareStep
from flatminima.variants import OrthogonalEscape, RandomSign, SingleExample

__all__ = [
    "ALGORITHMS",
    "SETTINGS",
    "RandomSubset",
    "Run",
    "Settings",
    "exact_interpolation",
    "make_step",
    "record_steps",
    "run_algorithm",
]

ALGORITHMS = ("GD", "SAM", "ahn-rs", "ahn-sa")


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


#: The settings of every row unless the row says otherwise.
SETTINGS = Settings()


class RandomSubset(BatchRule):
    """Both extra passes of Algorithm 2 on ``size`` examples drawn without replacement from the batch (a new draw
    every step): ``SingleExample`` for a mini-batch, for the batch-size experiment. The
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
    """The library's step for ``name`` (one of ``ALGORITHMS``) on ``model``; ``seed`` fixes the random draws
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
    returns), the curves at ``record_steps``.

    The step is the library's (``make_step``); the iteration is this function's, not
    ``flatminima.train.train``'s, because that loop runs epochs of mini-batches from a data set, while here each
    step is full-batch in float64, the dense Hessian is taken at the recorded steps and the ascent is detected per
    step (by counting forward passes)."""
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


def exact_interpolation(steps: int = 100) -> dict[str, float]:
    """How far each algorithm moves in ``steps`` steps from a minimum where every residual is exactly 0 in float64
    (small integer data, a dyadic factorisation): there ``grad f_i = 0`` for every example, so the normalised
    ascents of SAM and ``ahn-sa`` are zero (``DualNorm`` maps a zero gradient to a zero perturbation)."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(-3, 4, (12, 4), generator=gen).to(DTYPE)
    beta = torch.tensor([1.0, -2.0, 0.0, 1.0], dtype=DTYPE)
    q = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)
    problem = Problem(inputs, inputs @ beta, beta, 3, 0.5 * q, torch.outer(q, beta) / 0.5)
    if loss_at_start(problem) != 0.0:
        raise RuntimeError("the dyadic start should interpolate every example exactly")
    return {name: run_algorithm(problem, name, SETTINGS, steps).final["displacement"] for name in ALGORITHMS}
