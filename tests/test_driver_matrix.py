"""Issue 22's matrix: every registered sharpness-aware variant through every driver, against a hand-written loop.

Each cell builds two identical setups (same model, data and variant randomness, float64), drives one with the
driver under test and the other with :func:`reference_step`, a plain loop over SAM's public two-step API that
says which examples each pass sees, and compares the weights after a few steps. A forward pre-hook counts the
forward-backward passes of each optimizer step, which must equal the variant's declared cost (:data:`COST`,
from docs/variants.md and the variants' code). A driver that cannot support a variant refuses it with a one-line
reason, before any weight moves: batch-rule variants (n-SAM, RW-SAM, Ahn et al.'s SA) are driven by
``SharpnessAwareStep`` alone, and m-SAM groups are refused where the variant cannot split its step.

The closure, two-step and ``SharpnessAwareStep`` cells run by default; the Hugging Face and Lightning cells are
marked slow (``python3 -m pytest tests/test_driver_matrix.py --slow``).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flatminima.variants  # noqa: F401  (registers the papers' variants)
from flatminima import SAM, SharpnessAwareStep
from flatminima.batch_rules import BatchRule, make_probe
from flatminima.optim.registry import optimizer_names, optimizer_spec
from flatminima.train.builders import optimizer_request
from flatminima.train.config import TrainConfig

# ---------------------------------------------------------------------------- the matrix

# Left out: "sgd" and "adamw", the registry's two plain base optimisers (sharpness_aware=False, driven by PlainStep).
VARIANTS = tuple(name for name in optimizer_names() if optimizer_spec(name).sharpness_aware)

BATCH = 12  # examples per optimizer step
STEPS = 6  # optimizer steps per cell
GROUP = 4  # m of the m-SAM cells: 3 groups per batch
N_TRAIN = BATCH * STEPS  # the training set: the steps' batches, in order; n-SAM draws its ascent sample from it
SAMPLE = 2 * BATCH  # n-SAM's ascent sample: two batch-sized chunks
# ||g(w)|| of the Ahn cells' batches ranges over 0.28-0.78 (none within 0.04 of epsilon): the switch (a plain step
# while ||g(w)|| > epsilon) declines two or three of the six ascents, so both branches are driven and counted.
AHN_EPSILON = 0.65

# The variants' own options (TrainConfig fields): cadences short enough to show both kinds of step in 6 steps,
# weights and radii large enough that each rule's term moves the weights well beyond the tolerance.
CONFIG: dict[str, Any] = dict(
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    rho=0.1,
    seed=3,  # random-sam's trials for seed 3 and p = 0.5: SAM on steps 0, 3 and 4
    nsam_sample_size=SAMPLE,
    nsam_refresh_every=1,
    rwsam_lambda=2.0,
    rwsam_delta=1e-3,
    gsam_alpha=0.3,
    looksam_k=3,
    looksam_alpha=0.7,
    sam_every=2,
    sam_probability=0.5,
    ahn_epsilon=AHN_EPSILON,
    ahn_eta_prime=0.5,
    esam_beta=0.6,  # seed 3, 4 tensors: the six steps' masks are 1001, 1010, 1000, 1100, 1111, 0001
    esam_gamma=0.5,  # the descent on 6 of the 12 examples
    aesam_total_steps=STEPS,  # with the paper's defaults the policy then declines step 2 of the 6
)


@dataclass(frozen=True)
class Cost:
    """Forward-backward passes of a step that takes the ascent (a step without it, exempted by the cadence or
    declined at ``g(w)``, is one pass at ``w``), and forward passes without gradient (RW-SAM's scoring)."""

    passes: int
    probes: int = 0


# The declared cost per step, from docs/variants.md ("passes per step", "Cost per step") and the variants' code.
COST: dict[str, Cost] = {
    "sam": Cost(2),  # g(w), then g(w + e)
    "asam": Cost(2),  # SAM's two passes, the ascent scaled by |w| + eta
    "usam": Cost(2),  # SAM's two passes, e = rho g
    "ahn-rs": Cost(2),  # batch at w, batch at w + rho g (g random); 1 while ||g(w)|| > epsilon (declined)
    "ahn-sa": Cost(3),  # batch at w, then example i at w and at w + e; 1 while ||g(w)|| > epsilon (declined)
    "friendly-sam": Cost(2),  # SAM's two passes, the ascent along g - sigma m
    "gsam": Cost(2),  # SAM's two passes, g(w) kept for the descent
    "looksam": Cost(2),  # two on the ascent steps (t mod k = 0), one at w on the others (g + alpha g_v reused)
    "momentum-sam": Cost(1),  # e = -rho v / ||v|| needs no g(w): the only pass is at w + e
    "nsam": Cost(math.ceil(SAMPLE / BATCH) + 1),  # ceil(n / B) batch-sized chunks of the ascent sample at w + batch
    "periodic-sam": Cost(2),  # SAM on t mod k = 0, one pass at w (a plain step) otherwise
    "random-sam": Cost(2),  # SAM when the step's Bernoulli trial succeeds, one pass at w otherwise
    "rwsam": Cost(2, probes=1),  # SAM's two passes (the ascent reweighted) + one forward at w + delta z, no gradient
    "esam": Cost(2, probes=1),  # batch at w; one no-grad forward at w + e to score; the top gamma B at w + e
    "aesam": Cost(2),  # g(w), then g(w + e) when ||g(w)||^2 >= mu + c_t sigma; 1 when declined
    "wsam": Cost(2),  # SAM's two passes; g(w) kept for the weighted (or decoupled) descent
    "bsam": Cost(2),  # the first pass at a posterior draw w + z, the second at w + rho g / s
}
# Where m-SAM groups are refused, and by whom: the builder (config.group_size set), or SharpnessAwareStep when built.
MSAM_REFUSED_BY_BUILDER = ("friendly-sam", "momentum-sam")  # one EMA / one momentum perturbation per step
# the descent needs g(w), or a batch rule
MSAM_REFUSED_BY_STEP = ("aesam", "ahn-rs", "ahn-sa", "esam", "gsam", "looksam", "nsam", "rwsam", "wsam")

# 1e-12 on weights of size 0.1-1: both sides run the same maths in float64 (unit roundoff 1.1e-16), and differ
# only in summation order (a mean over 24 examples against two chunk means, F.cross_entropy's mean against
# .mean()). Six steps of lr 0.1 keep those 1e-16 differences far below 1e-13; a wrong pass, a wrong sample or a
# missing term of a rule moves the weights by 1e-4 or more.
TOLERANCE = 1e-12
REFUSAL = (ValueError, TypeError, NotImplementedError)


def test_every_sharpness_aware_variant_is_in_the_matrix() -> None:
    """A newly registered variant must be given its declared cost here (and so enter every driver's cells)."""
    plain = {"sgd", "adamw", "saf", "mesa"}  # the base optimisers, and SAF and MESA's one pass (PlainStep)
    assert len(optimizer_names()) == 21 and set(optimizer_names()) - set(VARIANTS) == plain
    assert set(COST) == set(VARIANTS)
    assert set(MSAM_REFUSED_BY_BUILDER) | set(MSAM_REFUSED_BY_STEP) <= set(VARIANTS)
    rules = {"ahn-sa", "esam", "nsam", "rwsam"}
    assert {name for name in VARIANTS if optimizer_spec(name).batch_rule is not None} == rules


# ---------------------------------------------------------------------------- setups


def make_model() -> nn.Sequential:
    """A 6-8-3 MLP in float64, no BatchNorm (running statistics are a separate concern)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def training_set() -> tuple[Tensor, Tensor]:
    """72 float64 examples of 6 features, 3 classes: the six steps' batches, and n-SAM's pool."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N_TRAIN, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N_TRAIN,), generator=gen)


def per_example_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per example (reduction="none"), as the batch rules that weight examples need."""
    return F.cross_entropy(outputs, targets, reduction="none")


def mean_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The mean loss of the examples ``x, y``: one forward pass of ``model``."""
    return per_example_loss(model(x), y).mean()


@dataclass
class Setup:
    """A variant as the registry builds it, on a fresh model, with the batches of its steps."""

    name: str
    model: nn.Sequential
    opt: SAM
    rule: BatchRule | None
    batches: list[tuple[Tensor, Tensor]]

    def weights(self) -> list[Tensor]:
        """Copies of the model's parameters now."""
        return [p.detach().clone() for p in self.model.parameters()]


def make_setup(name: str, group_size: int | None = None) -> Setup:
    """The registered builder's optimiser (and batch rule) for ``name``, with CONFIG's options; the same call
    gives the same model, data and draws."""
    model = make_model()
    x, y = training_set()

    def draw(n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randperm(N_TRAIN, generator=generator)[: N_TRAIN if n is None else n]
        return x[index], y[index]

    config = TrainConfig(optimizer=name, group_size=group_size, **CONFIG)
    request = optimizer_request(config, model, draw_examples=draw, train_size=N_TRAIN)
    spec = optimizer_spec(name)
    opt = spec.build(request)
    rule = spec.batch_rule(request) if spec.batch_rule is not None else None
    # The builders draw random directions, signs, examples and z from the global RNG, which the HF and Lightning
    # drivers also consume (set_seed, DataLoader seeds); a generator of the setup's own makes the draws the same.
    for index, owner in enumerate((opt.perturbation, rule)):
        if owner is not None and hasattr(owner, "generator"):
            owner.generator = torch.Generator().manual_seed(100 + index)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N_TRAIN, BATCH)]
    return Setup(name, model, opt, rule, batches)


# ---------------------------------------------------------------------------- the reference: SAM's API by hand


def first_pass(opt: SAM) -> contextlib.AbstractContextManager:
    """Where the pass at ``w`` is taken: bSAM takes it at a posterior draw (``opt.sampled_pass()``), the rest at w."""
    return opt.sampled_pass() if hasattr(opt, "sampled_pass") else contextlib.nullcontext()


def reference_step(setup: Setup, x: Tensor, y: Tensor, group_size: int | None = None) -> bool:
    """One step of the variant written out with first_step / second_step on a SAM without a batch rule; returns
    whether the step took the ascent (else it was one pass at ``w`` and a plain step along ``g(w)``)."""
    opt, model = setup.opt, setup.model
    opt.zero_grad()
    if not opt.ascent_due:  # periodic / random SAM's plain steps, LookSAM's steps reusing g_v: one pass at w
        mean_loss(model, x, y).backward()
        opt.second_step()
        return False
    if setup.rule is not None:
        return RULE_STEPS[setup.name](opt, model, setup.rule, x, y)
    if not opt.needs_first_pass:  # Momentum-SAM: e = -rho v / ||v|| from the momentum, no g(w)
        opt.first_step(zero_grad=True, first_pass=False)
        mean_loss(model, x, y).backward()  # the step's only pass, at w + e
        opt.second_step()
        return True
    if group_size is not None:
        return _msam_step(opt, model, x, y, group_size)
    with first_pass(opt):
        mean_loss(model, x, y).backward()  # g(w) of the batch
    if not opt.first_step(zero_grad=True):  # w -> w + e, unless the descent rule declines at g(w)
        assert opt.ascent_declined  # Ahn et al.'s switch, ||g(w)|| > epsilon: .grad still holds g(w)
        opt.second_step()
        return False
    mean_loss(model, x, y).backward()  # g(w + e) of the batch
    opt.second_step()  # back to w, the base step along the descent rule's direction
    return True


def _msam_step(opt: SAM, model: nn.Module, x: Tensor, y: Tensor, m: int) -> bool:
    """m-SAM (Foret et al. 2021, sec. 4.1): each group of m examples perturbed by its own e_k, and the gradients
    at the w + e_k averaged, weighted by group size."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for start in range(0, x.shape[0], m):
        xg, yg = x[start : start + m], y[start : start + m]
        opt.zero_grad()
        with first_pass(opt):
            mean_loss(model, xg, yg).backward()  # g_k(w), the group's
        opt.first_step(zero_grad=True)  # w -> w + e_k
        (mean_loss(model, xg, yg) * (xg.shape[0] / x.shape[0])).backward()  # its share of the descent
        opt.restore()  # back to w for the next group
        torch._foreach_add_(total, [p.grad for p in model.parameters()])
    for p, grad in zip(model.parameters(), total):
        p.grad = grad
    opt.second_step()
    return True


def _nsam_step(opt: SAM, model: nn.Module, rule: Any, x: Tensor, y: Tensor) -> bool:
    """n-SAM: the ascent from n other examples of the training set, the descent on the batch."""
    xs, ys = rule.ascent_sample(x, y, opt.steps)  # n examples drawn for this step (not the batch)
    assert xs.shape[0] == SAMPLE
    mean_loss(model, xs, ys).backward()  # g_n(w)
    opt.first_step(zero_grad=True)  # e = rho g_n / ||g_n||
    mean_loss(model, x, y).backward()  # the batch's gradient at w + e
    opt.second_step()
    return True


def _rwsam_step(opt: SAM, model: nn.Module, rule: Any, x: Tensor, y: Tensor) -> bool:
    """RW-SAM: the ascent loss sum_i p_i l_i over the batch, p = softmax(lambda s), the descent on the plain batch."""
    losses = per_example_loss(model(x), y)  # l_i(w) of the batch
    # s_i = |l_i(w + delta z) - l_i(w)| / delta, from one forward without gradient at w + delta z
    weights = rule.ascent_weights(losses.detach(), make_probe(model, per_example_loss, x, y))
    (weights * losses).sum().backward()  # grad of sum_i p_i l_i at w
    opt.first_step(zero_grad=True)
    assert rule.descent_weights() is None  # weighted_descent off (CONFIG)
    mean_loss(model, x, y).backward()  # the batch's plain mean at w + e
    opt.second_step()
    return True


def _ahn_sa_step(opt: SAM, model: nn.Module, rule: Any, x: Tensor, y: Tensor) -> bool:
    """Ahn et al.'s Algorithm 2: g of the batch, then example i's SAM perturbation and its gradient there."""
    xi, yi = rule.ascent_sample(x, y, opt.steps)  # example i, uniform in the batch (drawn on every step)
    mean_loss(model, x, y).backward()  # g = grad f(w), the batch's
    if not opt.keep_first_gradient():  # ||g|| > epsilon: a plain step along g
        opt.second_step()
        return False
    opt.zero_grad()
    mean_loss(model, xi, yi).backward()  # grad f_i(w)
    opt.first_step(zero_grad=True)  # e = s rho grad f_i / ||grad f_i||, s a random sign
    mean_loss(model, xi, yi).backward()  # u = grad f_i(w + e), the same example
    opt.second_step()  # the base step along g + (eta' / lr) (u - <u, g> / ||g||^2 g)
    return True


def _esam_step(opt: SAM, model: nn.Module, rule: Any, x: Tensor, y: Tensor) -> bool:
    """ESAM: the batch's mean at w (its per-example losses kept), e by SWP (this step's mask of tensors), one forward
    without gradient at w + e to score l_i(w + e) - l_i(w), the descent on the gamma B examples that rose most."""
    losses = per_example_loss(model(x), y)  # l_i(w) of the batch
    assert rule.ascent_weights(losses.detach(), make_probe(model, per_example_loss, x, y)) is None  # plain mean
    losses.mean().backward()  # g(w)
    opt.first_step(zero_grad=True)  # e_j = m_j rho g_j / (beta ||g_K||)
    xs, ys = rule.descent_sample(x, y)  # the forward at w + e, and the top-k examples by rise
    assert xs.shape[0] == BATCH // 2
    mean_loss(model, xs, ys).backward()  # their mean at w + e
    opt.second_step()
    return True


RULE_STEPS: dict[str, Callable[[SAM, nn.Module, Any, Tensor, Tensor], bool]] = {
    "nsam": _nsam_step,
    "rwsam": _rwsam_step,
    "ahn-sa": _ahn_sa_step,
    "esam": _esam_step,
}


def reference(name: str, group_size: int | None = None) -> tuple[list[Tensor], list[bool]]:
    """The reference run's final weights, and which of its steps took the ascent."""
    setup = make_setup(name)
    ascended = [reference_step(setup, x, y, group_size) for x, y in setup.batches]
    assert setup.opt.steps == STEPS
    # which steps ascend is the variant's own schedule: its cadence, and for Ahn et al. the switch at g(w)
    due = [setup.opt.cadence.takes_ascent(t) for t in range(STEPS)]
    declined = [d and not up for d, up in zip(due, ascended)]
    if name in ("aesam", "ahn-rs", "ahn-sa"):  # the switch at g(w): AHN_EPSILON, AE-SAM's policy
        assert any(declined) and any(ascended), "the switch at g(w) should let some steps perturb and decline others"
    else:
        assert not any(declined) and ascended == due
    return setup.weights(), ascended


def expected_passes(name: str, ascended: list[bool], groups: int = 1) -> list[int]:
    """The declared cost of each step, from which steps the reference's own schedule made ascend."""
    return [COST[name].passes * groups if up else 1 for up in ascended]


# ---------------------------------------------------------------------------- counting and checking


class PassCounter:
    """Forward passes of ``model`` per optimizer step (SAM's step counter during the pass): those with gradient
    enabled, each followed by a backward (the issue's forward-backward passes), and those without gradient
    (RW-SAM's scoring forward through torch.func.functional_call), counted apart."""

    def __init__(self, model: nn.Module, opt: SAM) -> None:
        self.opt = opt
        self.passes: Counter[int] = Counter()
        self.probes: Counter[int] = Counter()
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: Any) -> None:
        (self.passes if torch.is_grad_enabled() else self.probes)[self.opt.steps] += 1

    def per_step(self) -> tuple[list[int], list[int]]:
        """Stop counting; the forward-backward passes and the forwards without gradient of each step."""
        self.handle.remove()
        return [self.passes[t] for t in range(STEPS)], [self.probes[t] for t in range(STEPS)]


def check_cell(setup: Setup, counter: PassCounter, group_size: int | None = None) -> None:
    """The driven setup against the reference: weights to TOLERANCE, passes per step equal to the declared cost."""
    passes, probes = counter.per_step()
    weights, ascended = reference(setup.name, group_size)
    groups = 1 if group_size is None else math.ceil(BATCH / group_size)
    expected = expected_passes(setup.name, ascended, groups)
    expected_probes = [COST[setup.name].probes if up else 0 for up in ascended]
    moved = max((a - b).abs().max().item() for a, b in zip(weights, make_setup(setup.name).weights()))
    difference = max((a - b).abs().max().item() for a, b in zip(setup.weights(), weights))
    problems = []
    if setup.opt.steps != STEPS:
        problems.append(f"{setup.opt.steps} optimizer steps, expected {STEPS}")
    if passes != expected:
        problems.append(f"forward-backward passes per step {passes}, declared {expected}")
    if probes != expected_probes:
        problems.append(f"forward passes without gradient per step {probes}, declared {expected_probes}")
    if not difference <= TOLERANCE:
        problems.append(f"weights {difference:.3g} from the reference's (tolerance {TOLERANCE:g})")
    assert moved > 1e-3  # the reference trained: the comparison is not between two untouched models
    assert not problems, f"{setup.name}: " + "; ".join(problems)


@contextlib.contextmanager
def refused(setup: Setup, match: str = "(?i)batch rule") -> Iterator[None]:
    """The block must raise a refusal whose one-line message matches ``match``, leaving the weights as they were."""
    before = setup.weights()
    with pytest.raises(REFUSAL, match=match) as error:
        yield
    assert "\n" not in str(error.value).strip(), f"the reason should fit on one line: {error.value}"
    assert not setup.opt.is_perturbed
    assert all(torch.equal(a, b) for a, b in zip(setup.weights(), before)), "the refusal came after a weight moved"


def with_batch_rule(name: str) -> Setup:
    """The setup with its batch rule attached to the optimiser, as the registry's users will: ``opt.batch_rule``."""
    setup = make_setup(name)
    if setup.rule is not None:
        setup.opt.batch_rule = setup.rule
    return setup


def cells(drivers: tuple[str, ...]) -> list[Any]:
    """Every variant through each of ``drivers``, with ids such as ``momentum-sam-closure``."""
    return [pytest.param(name, driver, id=f"{name}-{driver}") for name in VARIANTS for driver in drivers]


# ---------------------------------------------------------------------------- closure, two-step, SharpnessAwareStep


def drive_closure(setup: Setup) -> None:
    """``opt.step(closure)``, the closure zeroing nothing: forward, backward, return the loss."""
    for x, y in setup.batches:

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            loss = mean_loss(setup.model, x, y)
            loss.backward()
            return loss

        setup.opt.step(closure)


def drive_two_step(setup: Setup) -> None:
    """davda54's pattern: backward at w, first_step, backward at w + e if the weights moved, second_step; without
    the pass at w for a variant that needs no g(w)."""
    opt, model = setup.opt, setup.model
    opt.zero_grad()
    for x, y in setup.batches:
        if opt.needs_first_pass:
            mean_loss(model, x, y).backward()
            moved = opt.first_step(zero_grad=True)
        else:
            moved = opt.first_step(zero_grad=True, first_pass=False)
        if moved:
            mean_loss(model, x, y).backward()
        opt.second_step(zero_grad=True)


def drive_step(setup: Setup, group_size: int | None = None) -> None:
    """``SharpnessAwareStep(model, loss_fn, opt)``, which reads the batch rule from the optimiser."""
    step = SharpnessAwareStep(setup.model, per_example_loss, setup.opt, group_size=group_size)
    for x, y in setup.batches:
        step(x, y)


@pytest.mark.parametrize(("name", "driver"), cells(("closure", "two-step", "sharpness-aware-step")))
def test_core_driver(name: str, driver: str) -> None:
    """The closure, two-step and SharpnessAwareStep drivers: the reference's weights at the declared cost; the
    first two refuse a batch-rule variant at the first step."""
    setup = with_batch_rule(name)
    if setup.rule is not None and driver == "closure":
        x, y = setup.batches[0]
        with refused(setup):
            setup.opt.step(lambda: mean_loss(setup.model, x, y).backward())
        return
    if name == "bsam" and driver == "two-step":  # davda54's pattern takes the first pass at w, not at a draw
        x, y = setup.batches[0]
        mean_loss(setup.model, x, y).backward()
        with refused(setup, match="sampled_pass"):
            setup.opt.first_step(zero_grad=True)
        return
    if setup.rule is not None and driver == "two-step":
        x, y = setup.batches[0]
        mean_loss(setup.model, x, y).backward()
        with refused(setup):
            setup.opt.first_step(zero_grad=True)
        with refused(setup):
            setup.opt.keep_first_gradient()
        return
    counter = PassCounter(setup.model, setup.opt)
    drivers = {"closure": drive_closure, "two-step": drive_two_step, "sharpness-aware-step": drive_step}
    drivers[driver](setup)
    check_cell(setup, counter)


@pytest.mark.parametrize("name", [pytest.param(name, id=f"{name}-sharpness-aware-step-m{GROUP}") for name in VARIANTS])
def test_msam_groups(name: str) -> None:
    """SharpnessAwareStep with m-SAM groups: the reference's m-SAM at 2 passes per group where the variant allows
    it; refused when built (by the registry's builder or the step) where it does not."""
    if name in MSAM_REFUSED_BY_BUILDER:
        with pytest.raises(ValueError, match=r"group.size") as error:
            make_setup(name, group_size=GROUP)
        assert "\n" not in str(error.value)
        return
    setup = with_batch_rule(name)
    if name in MSAM_REFUSED_BY_STEP:
        with refused(setup, match="group_size"):
            SharpnessAwareStep(setup.model, per_example_loss, setup.opt, group_size=GROUP)
        return
    counter = PassCounter(setup.model, setup.opt)
    drive_step(setup, group_size=GROUP)
    check_cell(setup, counter, group_size=GROUP)


def test_msam_refuses_flat_buffers() -> None:
    """m-SAM keeps earlier groups' gradients aside, which flatten=True does not allow: refused when built."""
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, flatten=True)
    with pytest.raises(ValueError, match="flatten") as error:
        SharpnessAwareStep(model, per_example_loss, opt, group_size=GROUP)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------- Hugging Face: sam_step and SAMTrainer


class HFModel(nn.Module):
    """The MLP as the Trainer takes a model: keyword inputs, a dict with the mean loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps process-wide singletons (mixed precision, sync flags); each cell starts clean."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def drive_sam_step(setup: Setup) -> Callable[[], None]:
    """``sam_step(accelerator, model, optimizer, loss_fn, batch)`` in a plain Accelerate loop; returns the loop."""
    from accelerate import Accelerator

    from flatminima.integrations.huggingface import sam_step

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(setup.model, setup.opt)

    def loop() -> None:
        for batch in setup.batches:
            sam_step(accelerator, model, optimizer, lambda m, b: mean_loss(m, *b), batch)

    return loop


def hf_trainer(setup: Setup, tmp_path: Path) -> Any:
    """SAMTrainer over the setup's batches, in order, one optimizer step per batch, no clipping."""
    from tests.test_integration_huggingface import InOrder, training_args

    x, y = training_set()
    args = training_args(tmp_path, per_device_train_batch_size=BATCH)
    data = [{"x": x[i], "labels": y[i]} for i in range(N_TRAIN)]
    return InOrder(model=HFModel(setup.model), args=args, train_dataset=data, optimizers=(setup.opt, None))


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(("name", "driver"), cells(("sam_step", "trainer")))
def test_huggingface_driver(name: str, driver: str, tmp_path: Path) -> None:
    """sam_step and SAMTrainer: the reference's weights at the declared cost; a batch-rule variant refused at the
    first sam_step call, and by SAMTrainer when built (at the latest at its first training step)."""
    setup = with_batch_rule(name)
    if driver == "sam_step":
        loop = drive_sam_step(setup)
        if setup.rule is not None:
            with refused(setup):
                loop()
            return
        counter = PassCounter(setup.model, setup.opt)
        loop()
    else:
        if setup.rule is not None:
            with refused(setup):
                hf_trainer(setup, tmp_path).train()
            return
        counter = PassCounter(setup.model, setup.opt)
        hf_trainer(setup, tmp_path).train()
    check_cell(setup, counter)


# ---------------------------------------------------------------------------- Lightning: SharpnessAwareMixin


def lightning_fit(setup: Setup) -> None:
    """``Trainer(max_steps=STEPS, accelerator="cpu", precision="64-true").fit`` of a SharpnessAwareMixin module whose
    configure_optimizers returns the setup's optimiser, over its batches in order."""
    import warnings

    import lightning as L

    from flatminima.integrations.lightning import SharpnessAwareMixin

    class Module(SharpnessAwareMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = setup.model

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return mean_loss(self.model, *batch)

        def configure_optimizers(self) -> SAM:
            return setup.opt

    x, y = training_set()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        trainer.fit(Module(), loader)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "driver"), cells(("lightning",)))
def test_lightning_driver(name: str, driver: str) -> None:
    """The Lightning mixin: the reference's weights at the declared cost; a batch-rule variant refused at the first
    step of fit."""
    pytest.importorskip("lightning")
    setup = with_batch_rule(name)
    if setup.rule is not None:
        with refused(setup):
            lightning_fit(setup)
        return
    counter = PassCounter(setup.model, setup.opt)
    lightning_fit(setup)
    check_cell(setup, counter)
